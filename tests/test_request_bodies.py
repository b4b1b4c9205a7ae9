"""Request bodies end to end: sent on byte for byte but for `model`, bounded one by one and all together, read
without holding the body twice; and what a body must be — within `server.max_body_bytes` once decoded (413
beyond it) and JSON the proxy can read (400 otherwise) — refused before any upstream is called.
(`body.parse_body` itself: test_body.py; what aiohttp's HTTP parser refuses: test_malformed_requests.py.)

The upstream of the first tests is a sink that counts and hashes what it receives (the shared fake reads at
most 1 MiB).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .fakes import chat_completion
from .helpers import (
    CHAT,
    assert_openai_error,
    big_request,
    build_config,
    raw_exchange,
    raw_post,
    raw_response,
    rss_mib,
    split_response,
)


class Sink:
    """An OpenAI-ish upstream that reads bodies of any size, keeping their size and SHA-256 only."""

    def __init__(self) -> None:
        self.received: list[tuple[int, str, bytes]] = []  # (size, sha256, first 200 bytes)
        app = web.Application(client_max_size=2**31)
        app.router.add_post("/v1/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _answer(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        head = b""
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
            head = (head + chunk)[:200] if len(head) < 200 else head
        self.received.append((size, digest.hexdigest(), head))
        return web.json_response(chat_completion("m1"))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    fake = Sink()
    await fake.server.start_server()
    yield fake
    await fake.server.close()


def expected_upstream_body(raw: bytes, model: str = "m1") -> bytes:
    return raw.replace(b'"model": "mana/x"', b'"model": "' + model.encode() + b'"')


@pytest.mark.parametrize("size", [1_000, 3_000_000])
async def test_the_upstream_gets_the_clients_bytes_with_only_model_changed(sink, make_proxy, size):
    proxy = await make_proxy(build_config({"a": sink.base_url}, {"mana/x": ["a/m1"]}))
    raw = big_request(size)

    resp = await proxy.client.post(CHAT, data=io.BytesIO(raw), headers={"Content-Type": "application/json"})

    assert resp.status == 200
    [(got_size, got_hash, _)] = sink.received
    expected = expected_upstream_body(raw)
    assert (got_size, got_hash) == (len(expected), hashlib.sha256(expected).hexdigest())


async def test_a_gzip_body_is_decoded_before_it_is_sent_on(sink, make_proxy):
    proxy = await make_proxy(build_config({"a": sink.base_url}, {"mana/x": ["a/m1"]}))
    raw = big_request(2_000_000)

    resp = await proxy.client.post(
        CHAT,
        data=io.BytesIO(gzip.compress(raw)),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )

    assert resp.status == 200
    assert sink.received[0][1] == hashlib.sha256(expected_upstream_body(raw)).hexdigest()


async def test_bodies_in_flight_past_the_budget_are_refused_with_retry_after(sink, make_proxy):
    proxy = await make_proxy(
        build_config({"a": sink.base_url}, {"mana/x": ["a/m1"]}, server={"max_inflight_body_bytes": 100_000})
    )
    port = proxy.client.server.port
    held = big_request(80_000)
    # A client uploading slowly: 70,000 of its bytes are in and held while the rest has not arrived.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = raw_post("/v1/chat/completions", held)
    split = len(request) - len(held) + 70_000
    writer.write(request[:split])
    await writer.drain()
    await asyncio.sleep(0.2)

    refused = await proxy.client.post(CHAT, data=big_request(40_000), headers={"Content-Type": "application/json"})

    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["code"] == "body_budget_exhausted"
    writer.write(request[split:])
    await writer.drain()
    assert split_response(await asyncio.wait_for(reader.read(), 5))[0] == 200
    writer.close()
    accepted = await proxy.client.post(CHAT, data=big_request(40_000), headers={"Content-Type": "application/json"})
    assert accepted.status == 200
    assert proxy.gateway.body_budget.held == 0


async def test_a_body_that_stops_arriving_is_a_408_and_the_connection_closes(sink, make_proxy):
    proxy = await make_proxy(
        build_config({"a": sink.base_url}, {"mana/x": ["a/m1"]}, server={"body_timeout_seconds": 0.3})
    )
    body = orjson.dumps({"model": "mana/x", "messages": []})
    request = raw_post("/v1/chat/completions", body + b" " * 100)

    raw = await raw_response(proxy.client.server.port, request[:-50])  # the last 50 bytes never come

    status, headers, answer = split_response(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert orjson.loads(answer)["error"]["code"] == "body_timeout"
    assert sink.received == []


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(sink, make_proxy):
    proxy = await make_proxy(build_config({"a": sink.base_url}, {"mana/x": ["a/m1"]}, server={"max_body_bytes": 1000}))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"

    raw = await raw_response(proxy.client.server.port, head)  # the body is never sent

    status, headers, answer = split_response(raw)
    assert status == 413
    assert headers["connection"] == "close"
    assert orjson.loads(answer)["error"]["code"] == "request_too_large"


async def test_concurrent_gzip_uploads_cost_at_most_three_times_their_decoded_size(sink, serve):
    """The gzip amplification the hardening issue measured: 8-9x the body per request, before."""
    size = 24 * 2**20
    # All four come from one address: one client, let it hold the whole pool here.
    server = {"max_inflight_body_bytes_per_client": 256 * 2**20}
    process = await serve(build_config({"a": sink.base_url}, {"mana/x": ["a/m1"]}, server=server))
    assert process.proc is not None
    rss_before, _ = rss_mib(process.proc.pid)
    compressed = gzip.compress(big_request(size), 6)

    async def upload() -> int:
        request = raw_post(
            "/v1/chat/completions", compressed, headers={"Content-Encoding": "gzip", "Connection": "close"}
        )
        return split_response(await raw_exchange(process.port, request, timeout=30))[0]

    statuses = await asyncio.gather(*(upload() for _ in range(4)))

    assert statuses == [200] * 4
    _, peak = rss_mib(process.proc.pid)
    assert peak - rss_before <= 4 * 3 * size / 2**20, f"peak {peak:.0f} MiB from {rss_before:.0f} MiB"


# -- what a body must be: at most max_body_bytes once decoded, JSON the proxy can read -----------------------


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
