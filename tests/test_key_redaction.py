"""An upstream that echoes our provider key never hands it on: not to the client, a log line or /v1/health."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from .fakes import chat_chunks, echo_credentials, json_reply, sse_event, sse_reply
from .helpers import CHAT, build_config, chat

KEY = "test-provider-key-0123456789"


@pytest.fixture
async def setup(make_upstream, make_proxy, caplog):
    """Provider `a` (keyed, echoes credentials when told to) before a healthy provider `b`."""
    caplog.set_level(logging.DEBUG)
    a = await make_upstream("a")
    b = await make_upstream("b")
    providers = {"a": {"base_url": a, "api_key": "${A_KEY}"}, "b": b}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1", "b/m2"]}), env={"A_KEY": KEY})
    return a, proxy


async def everything_visible(proxy, caplog, *bodies: str) -> str:
    health = await (await proxy.client.get("/v1/health")).text()
    return "\n".join([*bodies, health, caplog.text])


@pytest.mark.parametrize("status", [400, 413, 422])
@pytest.mark.parametrize("shape", ["openai", "json", "text"])
async def test_a_caller_error_that_echoes_our_key_is_relayed_redacted(setup, caplog, status, shape):
    a, proxy = setup
    a.queue(echo_credentials(status, shape=shape))

    resp = await proxy.client.post(CHAT, json=chat())
    body = await resp.text()

    assert resp.status == status
    if shape != "text":  # a text body is not quoted in our wrapper at all
        assert "Authorization: Bearer [redacted]" in body
    assert KEY not in await everything_visible(proxy, caplog, body)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_failure_that_echoes_our_key_is_shown_redacted(setup, caplog, stream):
    a, proxy = setup
    a.queue(echo_credentials(401))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))
    body = await resp.text()

    assert resp.status == 200  # fell back to b
    detail = (await (await proxy.client.get("/v1/health")).json())["providers"]["a"]["models"]["m1"]  # 401: noted there
    assert "Bearer [redacted]" in detail["last_error"]
    assert KEY not in await everything_visible(proxy, caplog, body)


async def test_an_error_event_or_error_answer_that_echoes_our_key_is_shown_redacted(setup, caplog):
    a, proxy = setup
    a.queue(
        sse_reply([{"error": {"message": f"bad key {KEY}"}}], done=False),
        json_reply({"error": {"message": f"Authorization: Bearer {KEY}"}}),
    )

    bodies = [await (await proxy.client.post(CHAT, json=chat(stream=stream))).text() for stream in (True, False)]

    assert KEY not in await everything_visible(proxy, caplog, *bodies)
    assert (
        "[redacted]"
        in (await (await proxy.client.get("/v1/health")).json())["providers"]["a"]["models"]["m1"]["last_error"]
    )


SHORT_KEY = "k7short"  # 7 characters: under redact.MIN_SECRET_LENGTH, as self-hosted servers are often given


@pytest.fixture
async def lone_short_keyed(make_upstream, make_proxy, caplog):
    """One chain entry, whose provider has a 7-character key: its errors are relayed, not fallen back from."""
    caplog.set_level(logging.DEBUG)
    a = await make_upstream("a")
    providers = {"a": {"base_url": a, "api_key": "${A_KEY}"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1"]}), env={"A_KEY": SHORT_KEY})
    return a, proxy


@pytest.mark.parametrize(("status", "relayed"), [(400, 400), (401, 502), (500, 500)])
async def test_a_short_key_echoed_back_is_redacted_in_the_answer_and_health(lone_short_keyed, caplog, status, relayed):
    a, proxy = lone_short_keyed
    a.queue(echo_credentials(status))

    resp = await proxy.client.post(CHAT, json=chat())
    body = await resp.text()

    assert resp.status == relayed
    assert "Bearer [redacted]" in body
    health = await (await proxy.client.get("/v1/health")).json()
    if status != 400:  # a caller error is not the provider's failure
        failed = health["providers"]["a"]["models"]["m1"]  # a request's 401 too: only a probe blames the key
        assert "Bearer [redacted]" in failed["last_error"]
    assert SHORT_KEY not in await everything_visible(proxy, caplog, body)


def test_check_warns_about_a_key_too_short_to_redact_and_never_prints_it(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(
        build_config({"a": {"base_url": "http://127.0.0.1:9/v1", "api_key": "${A_KEY}"}}, {"mana/x": ["a/m1"]})
    )
    result = subprocess.run(
        [sys.executable, "-m", "manaproxy", "check", "--config", str(path)],
        env={**os.environ, "A_KEY": SHORT_KEY},
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )

    assert result.returncode == 0
    assert "warning: providers.a.api_key is shorter than 8 characters" in result.stderr
    assert SHORT_KEY not in result.stdout + result.stderr


async def test_serve_warns_at_start_about_a_key_too_short_to_redact(serve):
    config = build_config({"a": {"base_url": "http://127.0.0.1:9/v1", "api_key": "${A_KEY}"}}, {"mana/x": ["a/m1"]})
    proc = await serve(config, A_KEY=SHORT_KEY)

    assert proc.lines_with("providers.a.api_key is shorter than 8 characters")
    assert SHORT_KEY not in proc.stderr


def error_events(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith("data:") and '"error"' in line]


@pytest.mark.parametrize("one_chunk", [False, True])
async def test_an_error_event_after_the_commit_is_redacted_and_the_stream_ends_with_one_error_event(
    setup, caplog, one_chunk
):
    a, proxy = setup
    chunks = chat_chunks("m1", ["Hello"])
    error = {"error": {"message": f"Authorization: Bearer {KEY} is over quota", "type": "server_error"}}
    events = [*chunks[:2], error, *chunks[2:]]
    a.queue(sse_reply([b"".join(sse_event(e) for e in [*events, b"data: [DONE]\n\n"])] if one_chunk else events))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.text()

    assert resp.status == 200
    assert '"content":"Hello"' in body  # what came before the error event is relayed
    (event,) = error_events(body)
    assert "upstream a/m1 failed mid-stream: upstream sent an error event" in event
    assert "Bearer [redacted]" in event
    assert "[DONE]" not in body
    assert KEY not in await everything_visible(proxy, caplog, body)


async def test_a_responses_error_event_after_the_commit_is_redacted_and_ends_the_stream_once(setup, caplog):
    a, proxy = setup
    created = {"type": "response.created", "response": {"id": "r1", "model": "m1"}}
    failed = {"type": "error", "code": "bad", "message": f"bad key {KEY}", "param": None}
    a.queue(sse_reply([b"event: response.created\n" + sse_event(created), b"event: error\n" + sse_event(failed)]))

    resp = await proxy.client.post("/v1/responses", json={"model": "mana/x", "input": "hi", "stream": True})
    body = await resp.text()

    assert resp.status == 200
    assert body.count("event: error") == 1
    assert "upstream a/m1 failed mid-stream: upstream sent an error event: bad key [redacted]" in body
    assert KEY not in await everything_visible(proxy, caplog, body)
