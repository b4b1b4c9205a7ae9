"""Hostile input: whatever bytes, `model` strings or headers a client sends, the answer is the precise
error they deserve (or the answer itself) — never a 500, never an echo of the input."""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import unquote

import orjson
import pytest

from .fakes import chat_completion, json_reply
from .helpers import CHAT, assert_openai_error, build_config, chat, raw_exchange, split_response


@pytest.fixture
async def unlimited(make_upstream, make_proxy):
    """Providers a and ollama (one fake that answers everything), alias mana/x (the default), the default body
    limit: every request reaches the parser, the router and, if it gets that far, the upstream."""
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("whatever"))
    proxy = await make_proxy(build_config({"a": up, "ollama": up}, {"mana/x": ["a/m1"]}, default="mana/x"))
    return up, proxy


def random_bodies() -> list[bytes]:
    rng = random.Random(2024)
    return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]


# (body, status, code): what each deserves.
HOSTILE_BODIES: list[tuple[bytes, int, str | None]] = [
    *((body, 400, "invalid_json") for body in random_bodies()),
    (b"\xef\xbb\xbf{}", 400, "invalid_json"),  # BOM
    (b'{"model": "\\ud800"}', 400, "invalid_json"),  # lone surrogate
    # Nested beyond `server.max_json_depth` (128); deep, but within it, and sent on as it came.
    (b'{"model": "mana/x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "json_too_deep"),
    (b'{"model": "mana/x", "messages": ' + b"[" * 500 + b"]" * 500 + b"}", 400, "json_too_deep"),
    (b'{"model": "mana/x", "messages": ' + b"[" * 127 + b"]" * 127 + b"}", 200, None),
    # Numbers no float holds: the client's bytes go upstream as they are (body.py).
    (b'{"model": "mana/x", "n": 1e999}', 200, None),
    (b'{"model": "mana/x", "n": 123456789012345678901234567890}', 200, None),
    (b'{"model": "mana/x", "model": 5}', 400, "duplicate_model"),  # first-wins and last-wins parsers disagree
    (b'{"model": "mana/x"} trailing', 400, "invalid_json"),
    (b"\x00" * 50, 400, "invalid_json"),
    (b"{" * 300, 400, "json_too_deep"),  # the structure is bounded before the JSON is read
]


async def test_hostile_bodies_get_their_precise_error(unlimited):
    up, proxy = unlimited
    paths = [CHAT, "/v1/completions", "/v1/embeddings", "/v1/anything/else"]
    for index, (body, status, code) in enumerate(HOSTILE_BODIES):
        resp = await proxy.client.post(paths[index % len(paths)], data=body)
        if status == 200:
            assert resp.status == 200, (body[:80], await resp.text())
        else:
            await assert_openai_error(resp, status, code)
    assert up.calls == 3


# (model, status, code): what each deserves. Answered ones reach the upstream with their model part as sent.
HOSTILE_MODELS: list[tuple[Any, int, str | None]] = [
    ("x" * 2_000, 400, "invalid_model"),
    ("mana/" + "x" * 200_000, 400, "invalid_model"),
    ("nope/" + "x" * 200_000, 400, "invalid_model"),
    ("ollama/" + "y" * 4_000, 400, "invalid_model"),
    ("a/" + "🙂" * 1000, 400, "invalid_model"),
    ("mana/🙂", 404, "model_not_found"),
    ("mana/", 404, "model_not_found"),
    ("מודל/עברית", 400, "unknown_provider"),
    ("ollama/e\u0301\u200f\u202e", 400, "invalid_model"),  # bidi controls
    ("a/%2e%2e%2f", 200, None),
    ("a/../../etc/passwd", 200, None),
    ("a/m1?x=1#frag", 200, None),
    ("ollama/ with spaces ", 200, None),
    ("\u2028\u2029", 400, "invalid_model"),
    ("a/" + "\ufeff", 400, "invalid_model"),
    ({"$ne": None}, 400, "invalid_model"),
    ([[[[[]]]]], 400, "invalid_model"),
    (-1, 400, "invalid_model"),
    (1.5, 400, "invalid_model"),
]


async def test_hostile_models_get_their_precise_answer(unlimited):
    up, proxy = unlimited
    for model, status, code in HOSTILE_MODELS:
        for stream in (False, True):
            calls = up.calls
            resp = await proxy.client.post(CHAT, json={"model": model, "messages": [{"x": model}], "stream": stream})
            body = await resp.read()
            if status == 200:
                assert resp.status == 200, (model, body[:200])
                provider, _, model_part = model.partition("/")
                assert up.requests[-1].json["model"] == model_part
                # percent-encoded where not printable ASCII, `%` included (README)
                assert unquote(resp.headers["X-Mana-LLM-Resolved"]) == f"{provider}/{model_part}".strip()
            else:
                await assert_openai_error(resp, status, code, param="model")
                assert len(body) < 2000  # client text is cut short in messages, never echoed whole
                assert up.calls == calls


async def test_hostile_headers_get_their_precise_answer(unlimited):
    up, proxy = unlimited
    for headers in [
        {"Content-Type": "text/plain"},  # the body is JSON whatever the client calls it
        {"Content-Type": "application/json; charset=latin-1"},
        {"X-API-Key": "\u00ff\u00fe"},  # auth is off
        {"Accept": "text/event-stream"},
        {"Accept-Encoding": "gzip, br, zstd"},
        {"Origin": "null"},
    ]:
        resp = await proxy.client.post(CHAT, json=chat(), headers=headers)
        assert (resp.status, resp.headers["X-Mana-LLM-Resolved"]) == (200, "a/m1"), headers
        assert "Access-Control-Allow-Origin" not in resp.headers

    resp = await proxy.client.post(CHAT, json=chat(), headers={"X-Request-ID": "é" * 64})
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == up.requests[-1].headers["X-Request-ID"] != "é" * 64

    calls = up.calls
    resp = await proxy.client.post(CHAT, json=chat(), headers={"Authorization": "Bearer " + "z" * 10_000})
    error = await assert_openai_error(resp, 431, "header_too_large")
    assert "zzzz" not in error["message"]
    assert up.calls == calls


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["ollama/x\r\nSet-Cookie: a=b", "gemma\nx", "a/m\x00", "a/m\x1b[31m"])
async def test_control_characters_in_model_are_refused(unlimited, model, stream):
    up, proxy = unlimited

    resp = await proxy.client.post(CHAT, json={"model": model, "stream": stream})

    error = await assert_openai_error(resp, 400, "invalid_model", param="model")
    assert error["message"] == "model name contains control characters"
    assert "Set-Cookie" not in resp.headers
    assert up.calls == 0


@pytest.mark.parametrize("model", ["ollama/" + "y" * 20_000, "z" * 200_000])
async def test_overlong_model_gets_a_short_readable_answer(unlimited, model):
    up, proxy = unlimited

    resp = await proxy.client.post(CHAT, json={"model": model})

    error = await assert_openai_error(resp, 400, "invalid_model", param="model")
    assert error["message"] == "model name is longer than 512 characters"
    assert up.calls == 0


async def test_accept_header_that_is_not_utf8_neither_fails_nor_hurts_the_provider(make_upstream, make_proxy):
    """The client's Accept is the one header forwarded as sent: undecodable bytes must not break the call."""
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health={"failure_threshold": 1}))
    body = orjson.dumps(chat())
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAccept: \xff\xfe text/\xc3\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body

    status, headers, _ = split_response(await raw_exchange(proxy.port, request))

    assert (status, headers["x-mana-llm-resolved"]) == (200, "a/m1")
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0
