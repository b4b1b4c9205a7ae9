"""Multipart endpoints (audio transcriptions and translations, image edits) are routed by their `model`
form field like JSON requests; only that field changes on the way, file bytes arrive identical.
Endpoints that address objects stored at one provider cannot be routed and say so."""

from __future__ import annotations

import io
import os

import pytest
from aiohttp import FormData

from .fakes import json_reply, status_reply
from .helpers import AUDIO, build_config, form_part


@pytest.fixture
async def setup(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    aliases = {"mana/whisper": ["a/whisper-large-v3", "b/whisper-1"]}
    proxy = await make_proxy(build_config({"a": a, "b": b}, aliases, server={"max_body_bytes": 200_000}))
    return a, b, proxy


async def test_a_transcription_is_routed_by_its_model_field_and_falls_back(setup):
    a, b, proxy = setup
    a.queue(status_reply(503))
    b.queue(json_reply({"text": "hello there"}))
    client = proxy.sdk()

    raw = await client.audio.transcriptions.with_raw_response.create(
        model="mana/whisper", file=("speech.wav", AUDIO, "audio/wav"), language="en"
    )
    await client.close()

    assert raw.parse().text == "hello there"
    assert raw.headers["X-Mana-LLM-Resolved"] == "b/whisper-1"
    first, second = a.requests[0], b.requests[0]
    assert second.path == "/v1/audio/transcriptions"
    assert second.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert form_part(first.body, "model") == b"whisper-large-v3"
    assert form_part(second.body, "model") == b"whisper-1"
    assert form_part(second.body, "file") == AUDIO
    assert form_part(second.body, "language") == b"en"


@pytest.mark.parametrize("path", ["/v1/audio/translations", "/v1/images/edits"])
async def test_other_multipart_endpoints_are_routed_too(setup, path):
    a, _, proxy = setup
    a.queue(json_reply({"text": "ok"}))
    form = FormData()
    form.add_field("model", "mana/whisper")
    form.add_field("image" if "images" in path else "file", io.BytesIO(AUDIO), filename="x.bin")

    resp = await proxy.client.post(path, data=form)

    assert resp.status == 200
    assert form_part(a.requests[0].body, "model") == b"whisper-large-v3"


async def test_a_form_without_a_model_field_goes_to_the_default_alias_or_is_refused(setup):
    _, _, proxy = setup
    form = FormData()
    form.add_field("file", io.BytesIO(b"abc"), filename="x.wav")

    resp = await proxy.client.post("/v1/audio/transcriptions", data=form)

    assert resp.status == 400  # no default alias configured
    assert (await resp.json())["error"]["code"] == "model_required"


async def test_a_form_over_the_body_limit_is_a_413(setup):
    _, _, proxy = setup
    form = FormData()
    form.add_field("model", "mana/whisper")
    form.add_field("file", io.BytesIO(os.urandom(300_000)), filename="big.wav")

    resp = await proxy.client.post("/v1/audio/transcriptions", data=form)

    assert resp.status == 413


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/files", 405),
        ("DELETE", "/v1/files/file-abc", 405),
        ("GET", "/v1/responses/resp_123", 405),
        ("GET", "/v1/batches/batch_1", 405),
        ("POST", "/v1/batches", 404),
        ("POST", "/v1/responses/resp_123/cancel", 404),
    ],
)
async def test_endpoints_of_stored_objects_say_they_cannot_be_routed(setup, method, path, status):
    a, b, proxy = setup

    resp = await proxy.client.request(method, path, json={"input_file_id": "file-1"} if method == "POST" else None)
    error = (await resp.json())["error"]

    assert resp.status == status
    assert "routed by their 'model'" in error["message"] or "routes requests by their 'model'" in error["message"]
    if status == 405:
        assert resp.headers["Allow"] == "POST"
    assert a.requests == b.requests == []


async def test_a_stored_object_upload_with_a_file_form_is_refused_not_sent_to_a_default(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, default="mana/x"))
    form = FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", io.BytesIO(b'{"custom_id": "1"}\n'), filename="batch.jsonl")

    resp = await proxy.client.post("/v1/files", data=form)

    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unsupported_endpoint"
    assert up.requests == []
