"""What a request body must be, end to end: within `server.max_body_bytes` once decoded (413 beyond it) and
JSON the proxy can read (400 otherwise) — refused before any upstream is called.

(How bodies are sent on byte for byte, budgeted and timed: test_request_bodies.py; `body.parse_body` itself:
test_body.py.)"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .helpers import CHAT, assert_openai_error, build_config

# -- body checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        pytest.param(b'{"model": "mana/x",', "invalid_json", None, id="truncated-json"),
        pytest.param(b"", "invalid_json", None, id="empty"),
        pytest.param(b"model=mana/x", "invalid_json", None, id="form-encoded"),
        pytest.param(b'[{"model": "mana/x"}]', "invalid_json", None, id="array"),
        pytest.param(b'"mana/x"', "invalid_json", None, id="string"),
        pytest.param(b"null", "invalid_json", None, id="null"),
        pytest.param(b'{"model": 123}', "invalid_model", "model", id="model-number"),
        pytest.param(b'{"model": ["mana/x"]}', "invalid_model", "model", id="model-array"),
        pytest.param(b'{"model": {"name": "mana/x"}}', "invalid_model", "model", id="model-object"),
        pytest.param(b'{"model": true}', "invalid_model", "model", id="model-bool"),
        pytest.param(b'{"model": "mana/x", "stream": "yes"}', "invalid_stream", "stream", id="stream-string"),
        pytest.param(b'{"model": "mana/x", "stream": 1}', "invalid_stream", "stream", id="stream-number"),
    ],
)
async def test_bad_body_is_400(routed_proxy, body, code, param):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})

    error = await assert_openai_error(resp, 400, code, param=param)
    assert error["type"] == "invalid_request_error"
    assert up.calls == 0


async def _chunks(body: bytes, size: int = 300) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def padded(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    head = b'{"model": "mana/x", "messages": [], "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413(routed_proxy, chunked):
    up, proxy = routed_proxy
    body = padded(5000)

    data = _chunks(body) if chunked else body
    resp = await proxy.client.post(CHAT, data=data, headers={"Content-Type": "application/json"})

    error = await assert_openai_error(resp, 413, "request_too_large")
    assert "1000" in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_at_the_limit_is_accepted(routed_proxy, chunked):
    up, proxy = routed_proxy
    body = padded(1000)

    resp = await proxy.client.post(CHAT, data=_chunks(body) if chunked else body)

    assert resp.status == 200
    assert up.requests[0].json["pad"] == json.loads(body)["pad"]


# -- compressed and nested bodies ---------------------------------------------------------------------------


async def test_undecodable_compressed_request_body_is_a_400(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(
        CHAT, data=b"this is not gzip", headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )

    await assert_openai_error(resp, 400, "invalid_body")
    assert a.calls == 0


async def test_gzip_bomb_is_limited_by_its_decoded_size(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server={"max_body_bytes": 10_000}))
    bomb = gzip.compress(b'{"model": "mana/x", "pad": "' + b"x" * 2_000_000 + b'"}')
    assert len(bomb) < 10_000

    resp = await proxy.client.post(
        CHAT, data=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )

    await assert_openai_error(resp, 413, "request_too_large")
    assert a.calls == 0


async def test_body_nested_too_deep_to_forward_is_a_400_not_a_provider_outage(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health={"failure_threshold": 1}))
    body = b'{"model": "mana/x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})

    await assert_openai_error(resp, 400, "json_too_deep")
    health = proxy.gateway.health
    assert (health.get("a").breaker.consecutive_failures, health.breaker("a")) == (0, "closed")
    assert a.calls == 0


async def test_body_nested_within_what_can_be_forwarded_reaches_the_upstream_intact(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    nested: Any = []
    for _ in range(120):
        nested = [nested]

    resp = await proxy.client.post(CHAT, json={"model": "mana/x", "messages": nested})

    assert resp.status == 200
    assert a.requests[0].json == {"model": "m1", "messages": nested}
