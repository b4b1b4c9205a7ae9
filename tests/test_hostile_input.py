"""Hostile input: whatever bytes, `model` strings or headers a client sends, the answer is the precise
error they deserve (or the answer itself) — never a 500, never an echo of the input."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from .helpers import CHAT, assert_openai_error, build_config, chat, raw_exchange, split_response


def hostile_bodies() -> list[bytes]:
    rng = random.Random(2024)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]
    bodies += [
        b"\xef\xbb\xbf{}",  # BOM
        b'{"model": "\\ud800"}',  # lone surrogate
        b'{"model": "mana/x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nesting beyond the parser's limit
        b'{"model": "mana/x", "messages": ' + b"[" * 500 + b"]" * 500 + b"}",  # deep but parseable
        b'{"model": "mana/x", "n": 1e999}',
        b'{"model": "mana/x", "n": 123456789012345678901234567890}',
        b'{"model": "mana/x", "model": 5}',
        b'{"model": "mana/x"} trailing',
        b"\x00" * 50,
        b"{" * 300,
    ]
    return bodies


HOSTILE_MODELS: list[Any] = [
    "x" * 2_000,
    "mana/" + "x" * 200_000,
    "nope/" + "x" * 200_000,
    "ollama/" + "y" * 4_000,
    "a/" + "🙂" * 1000,
    "mana/🙂",
    "mana/",
    "מודל/עברית",
    "ollama/e\u0301\u200f\u202e",
    "a/%2e%2e%2f",
    "a/../../etc/passwd",
    "a/m1?x=1#frag",
    "ollama/ with spaces ",
    "\u2028\u2029",
    "a/" + "\ufeff",
    {"$ne": None},
    [[[[[]]]]],
    -1,
    1.5,
]


async def test_hostile_input_never_yields_500(routed_proxy):
    _up, proxy = routed_proxy
    paths = [CHAT, "/v1/completions", "/v1/embeddings", "/v1/anything/else"]
    statuses = []
    for index, body in enumerate(hostile_bodies()):
        resp = await proxy.client.post(paths[index % len(paths)], data=body)
        statuses.append(resp.status)
        assert resp.status < 500, (body[:80], resp.status, await resp.text())
        if resp.status >= 400:
            await assert_openai_error(resp, resp.status)
    assert 400 in statuses


async def test_hostile_models_never_yield_500(make_upstream, make_proxy):
    up = await make_upstream("up")
    providers = {"a": up, "ollama": up}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1"]}, default="mana/x"))
    for model in HOSTILE_MODELS:
        for stream in (False, True):
            resp = await proxy.client.post(CHAT, json={"model": model, "messages": [{"x": model}], "stream": stream})
            assert resp.status < 500, (str(model)[:80], resp.status)
            body = await resp.read()
            if resp.status >= 400:
                await assert_openai_error(resp, resp.status)
                assert len(body) < 2000  # client text is cut short in messages, never echoed whole


async def test_hostile_headers_never_yield_500(routed_proxy):
    _up, proxy = routed_proxy
    for headers in [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json; charset=latin-1"},
        {"Authorization": "Bearer " + "z" * 10_000},
        {"X-API-Key": "\u00ff\u00fe"},
        {"X-Request-ID": "é" * 64},
        {"Accept": "text/event-stream"},
        {"Accept-Encoding": "gzip, br, zstd"},
        {"Origin": "null"},
    ]:
        resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers=headers)
        assert resp.status < 500, headers


@pytest.fixture
async def unlimited(make_upstream, make_proxy):
    """Providers a and ollama with the default body limit: requests reach the router and the upstream."""
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up, "ollama": up}, {"mana/x": ["a/m1"]}))
    return up, proxy


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["ollama/x\r\nSet-Cookie: a=b", "gemma\nx", "a/m\x00", "a/m\x1b[31m"])
async def test_control_characters_in_model_get_an_answer(unlimited, model, stream):
    _up, proxy = unlimited

    resp = await proxy.client.post(CHAT, json={"model": model, "stream": stream})

    assert resp.status < 500
    assert "Set-Cookie" not in resp.headers
    if resp.status >= 400:
        await assert_openai_error(resp, resp.status)


@pytest.mark.parametrize("model", ["ollama/" + "y" * 20_000, "z" * 200_000])
async def test_overlong_model_gets_a_readable_answer(unlimited, model):
    _up, proxy = unlimited

    resp = await proxy.client.post(CHAT, json={"model": model})

    assert resp.status < 500
    await resp.read()


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
