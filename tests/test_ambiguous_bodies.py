"""A body that two parsers would read differently is refused, never guessed at (issue 14, item 5): what
manaproxy routes and counts on is what the upstream runs. A form with two `model` fields by any spelling
(`name`, `name*` of RFC 8187), a file part whose quoted filename holds `;name=model;`, a JSON object with
two top-level `model` or `stream` members (escaped spellings included)."""

from __future__ import annotations

import pytest

from .fakes import json_reply
from .helpers import CHAT, assert_openai_error, build_config

TRANSCRIPTIONS = "/v1/audio/transcriptions"
BOUNDARY = "xYzBoundary"


def form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart/form-data body of `(Content-Disposition value, part body)` pairs."""
    out = b""
    for disposition, value in parts:
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


FORM_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
AUDIO = b"RIFF....WAVEfmt " + bytes(range(256)) * 8


@pytest.fixture
async def whisper(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = json_reply({"text": "heard"})
    aliases = {"mana/tiny": ["a/whisper-tiny"], "mana/large": ["a/whisper-large-v3"]}
    proxy = await make_proxy(build_config({"a": a}, aliases, default="mana/tiny"))
    return a, proxy


@pytest.mark.parametrize(
    "parts",
    [
        # Starlette (vLLM ...) runs the last, manaproxy routed the first.
        [
            ('form-data; name="model"', b"mana/tiny"),
            ('form-data; name="file"; filename="a.wav"', AUDIO),
            ('form-data; name="model"', b"whisper-large-v3"),
        ],
        # The second also by `name*` (which aiohttp reads; manaproxy used to ignore it), its names agreeing.
        [
            ('form-data; name="model"', b"mana/tiny"),
            ("form-data; name=model; NAME*=UTF-8''mod%65l", b"whisper-large-v3"),
        ],
    ],
)
async def test_a_form_with_two_model_fields_is_refused(whisper, parts):
    a, proxy = whisper
    resp = await proxy.client.post(TRANSCRIPTIONS, data=form(*parts), headers=FORM_TYPE)
    await assert_openai_error(resp, 400, "duplicate_model", param="model")
    assert a.calls == 0


@pytest.mark.parametrize(
    "disposition",
    [
        # Alone beside a file, and after a real model field (where it used to be ignored).
        "form-data; name*=utf-8''model",  # aiohttp reads a model field, Starlette none
        "form-data; NAME*=UTF-8''mod%65l",
        "form-data; name=\"prompt\"; name*=utf-8''model",
        'form-data; name="prompt"; name="model"',  # first-wins and last-wins again
    ],
)
@pytest.mark.parametrize("after_a_model_field", [False, True])
async def test_a_part_named_model_ambiguously_is_refused(whisper, disposition, after_a_model_field):
    a, proxy = whisper
    parts = [(disposition, b"mana/large"), ('form-data; name="file"; filename="a.wav"', AUDIO)]
    if after_a_model_field:
        parts.insert(0, ('form-data; name="model"', b"mana/tiny"))
    resp = await proxy.client.post(TRANSCRIPTIONS, data=form(*parts), headers=FORM_TYPE)
    await assert_openai_error(resp, 400, "ambiguous_model", param="model")
    assert a.calls == 0


async def test_a_form_with_two_stream_fields_is_refused(whisper):
    a, proxy = whisper
    parts = [
        ('form-data; name="model"', b"mana/tiny"),
        ('form-data; name="stream"', b"true"),
        ('form-data; name="stream"', b"false"),
    ]
    resp = await proxy.client.post(TRANSCRIPTIONS, data=form(*parts), headers=FORM_TYPE)
    await assert_openai_error(resp, 400, "duplicate_stream", param="stream")
    assert a.calls == 0


async def test_a_filename_quoting_name_model_is_the_file_and_the_real_model_field_is_spliced(whisper):
    a, proxy = whisper
    body = form(
        ('form-data; filename="a;name=model;b"; name="file"', b"mana/large"),
        ('form-data; name="model"', b"mana/tiny"),
    )
    resp = await proxy.client.post(TRANSCRIPTIONS, data=body, headers=FORM_TYPE)

    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/whisper-tiny"
    sent = a.requests[0].body
    # Exactly the part routed on changed; the file part, which only looked like `model`, is intact.
    assert sent == body.replace(b"\r\n\r\nmana/tiny\r\n", b"\r\n\r\nwhisper-tiny\r\n")


async def test_a_malformed_content_disposition_is_refused_not_guessed(whisper):
    a, proxy = whisper
    body = form(('form-data; name="model"; filename="unterminated', b"mana/tiny"))
    resp = await proxy.client.post(TRANSCRIPTIONS, data=body, headers=FORM_TYPE)
    await assert_openai_error(resp, 400, "invalid_body")
    assert a.calls == 0


@pytest.fixture
async def chat_proxy(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"], "mana/y": ["a/m2"]}))
    return a, proxy


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "mana/x", "messages": [], "model": "m2"}', "duplicate_model"),
        (b'{"mod\\u0065l": "mana/x", "messages": [], "model": "mana/y"}', "duplicate_model"),
        (b'{"model": null, "messages": [], "\\u006dodel": "mana/y"}', "duplicate_model"),
        (b'{"model": "mana/x", "stream": false, "messages": [], "stream": true}', "duplicate_stream"),
        (b'{"model": "mana/x", "str\\u0065am": true, "messages": [], "stream": false}', "duplicate_stream"),
    ],
)
async def test_a_json_body_with_a_top_level_member_twice_is_refused(chat_proxy, body, code):
    a, proxy = chat_proxy
    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    await assert_openai_error(resp, 400, code, param=code.removeprefix("duplicate_"))
    assert a.calls == 0


async def test_a_nested_model_or_a_model_value_is_no_duplicate(chat_proxy):
    a, proxy = chat_proxy
    body = (
        b'{"model": "mana/x", "messages": [{"role": "model", "content": "\\"model\\": 1"}],'
        b' "metadata": {"model": "mana/y", "stream": true}, "tools": [{"model": "z"}]}'
    )
    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert a.requests[0].body == body.replace(b'"model": "mana/x"', b'"model": "m1"', 1)
