"""Request bodies: sent on byte for byte but for `model`, bounded one by one and all together, and read
without holding the body twice.

The upstream here is a sink that counts and hashes what it receives (the shared fake reads at most 1 MiB).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .fakes import chat_completion
from .helpers import CHAT, big_request, build_config, raw_exchange, raw_post, raw_response, rss_mib, split_response


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
