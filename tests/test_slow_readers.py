"""Fair shares and slow readers: request bodies give their share back at the commit and no client holds
more than its share; a client that reads nothing of its answer is closed after `write_timeout_seconds`
(its upstream with it), and answers held for slow readers stay under `max_held_answer_bytes`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .fakes import Recorded, chat_chunks, chat_completion, hang, json_reply, sse_reply
from .helpers import CHAT, big_request, build_config, raw_post, split_response


async def open_client(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client with a small receive buffer that sends `request` and then reads only when told."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(2**20):
                data += chunk
    return data


async def test_uploads_held_by_long_streams_give_their_share_back_and_do_not_starve_others(make_upstream, make_proxy):
    up = await make_upstream("up")
    long_stream = sse_reply(chat_chunks("m1", ["a", "b"]), hang_after=1)  # first event, then a long answer

    async def answer(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        stream = isinstance(recorded.json, dict) and recorded.json.get("stream") is True
        return await (long_stream if stream else json_reply(chat_completion("m1")))(request, recorded)

    up.default = answer
    proxy = await make_proxy(
        build_config({"a": up}, {"mana/x": ["a/m1"]}, server={"max_inflight_body_bytes": 1_000_000})
    )
    body = orjson.dumps({"model": "mana/x", "stream": True, "messages": [{"role": "user", "content": "x" * 300_000}]})
    holders = [await open_client(proxy.port, raw_post(CHAT, body)) for _ in range(3)]
    for reader, _ in holders:  # each answer has begun and goes on: 900 kB of uploads would be held
        async with asyncio.timeout(5):
            await reader.readuntil(b"data: ")

    others = [await proxy.client.post(CHAT, data=big_request(300_000)) for _ in range(3)]

    assert [other.status for other in others] == [200, 200, 200]
    assert proxy.gateway.body_budget.held == 0
    for _, writer in holders:
        writer.close()


async def test_one_client_cannot_hold_more_than_its_share_of_the_body_budget(make_upstream, make_proxy):
    slow, fast = await make_upstream("slow"), await make_upstream("fast")
    slow.default = hang(30)
    config = build_config(
        {"slow": slow, "fast": fast},
        {"mana/slow": ["slow/m1"], "mana/fast": ["fast/m1"]},
        server={"max_inflight_body_bytes": 1_000_000, "max_inflight_body_bytes_per_client": 400_000},
    )
    proxy = await make_proxy(config, api_keys=[b"key-of-a", b"key-of-b"])
    upload = big_request(300_000, model="mana/slow")
    held = await open_client(proxy.port, raw_post(CHAT, upload, headers={"Authorization": "Bearer key-of-a"}))
    for _ in range(50):
        if proxy.gateway.body_budget.held:
            break
        await asyncio.sleep(0.02)

    async with asyncio.timeout(5):  # today: held by the slow answer, it would hang
        more = await proxy.client.post(CHAT, data=upload, headers={"Authorization": "Bearer key-of-a"})
        other = await proxy.client.post(
            CHAT, data=big_request(300_000, model="mana/fast"), headers={"X-API-Key": "key-of-b"}
        )

    assert more.status == 429
    assert more.headers["Retry-After"] == "1"
    assert (await more.json())["error"]["code"] == "client_body_budget_exhausted"
    assert other.status == 200
    assert proxy.gateway.body_budget.held_by("key-1") > 0
    held[1].close()


class EndlessStream:
    """An upstream streaming events as fast as it is read, until its client goes away."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = b"data: " + orjson.dumps({"model": "m1", "choices": [{"delta": {"content": "x" * 16_000}}]}) + b"\n\n"
        try:
            while True:
                await response.write(event)
        finally:
            self.disconnected.set()


@pytest.fixture
async def endless() -> AsyncIterator[EndlessStream]:
    fake = EndlessStream()
    await fake.server.start_server()
    yield fake
    await fake.server.close()


async def test_a_client_that_stops_reading_a_stream_is_closed_and_so_is_its_upstream(endless, make_proxy):
    url = str(endless.server.make_url("/v1"))
    proxy = await make_proxy(build_config({"a": url}, {"mana/x": ["a/m1"]}, server={"write_timeout_seconds": 0.5}))
    body = orjson.dumps({"model": "mana/x", "stream": True, "messages": []})
    reader, writer = await open_client(proxy.port, raw_post(CHAT, body))
    async with asyncio.timeout(5):
        await reader.readuntil(b"data: ")  # the answer has begun; now the client reads nothing

    async with asyncio.timeout(10):  # today: held forever
        await endless.disconnected.wait()
    await read_until_closed(reader)
    writer.close()


def big_answer(size: int) -> web.Response:
    return web.Response(body=b'{"model": "m1", "data": "' + b"x" * size + b'"}', content_type="application/json")


async def test_a_client_that_stops_reading_a_large_answer_is_closed_after_the_write_timeout(make_upstream, make_proxy):
    up = await make_upstream("up")
    size = 24 * 1024 * 1024

    async def answer(request: web.Request, recorded: object) -> web.StreamResponse:
        return big_answer(size)

    up.default = answer
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, server={"write_timeout_seconds": 0.5}))
    reader, writer = await open_client(proxy.port, raw_post(CHAT, orjson.dumps({"model": "mana/x"})))
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert split_response(head)[0] == 200

    await asyncio.sleep(2)  # reading nothing, well past the write timeout
    rest = await read_until_closed(reader)

    assert len(rest) < size  # today: all of it, the proxy holding it as long as the client likes
    assert proxy.client.server.runner.held_answers.held == 0
    writer.close()


async def test_answers_held_for_slow_readers_stay_under_the_budget_the_slowest_reader_cut(make_upstream, make_proxy):
    up = await make_upstream("up")
    size = 12 * 1024 * 1024  # the kernel takes up to ~5 MiB of each: the proxy holds the rest
    budget = 16 * 1024 * 1024

    async def answer(request: web.Request, recorded: object) -> web.StreamResponse:
        return big_answer(size)

    up.default = answer
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, server={"max_held_answer_bytes": budget}))
    held_answers = proxy.client.server.runner.held_answers
    clients = []
    peak = 0
    for _ in range(3):  # none reads: each leaves over half of its 12 MiB answer in the proxy's buffers
        clients.append(await open_client(proxy.port, raw_post(CHAT, orjson.dumps({"model": "mana/x"}))))
        for _ in range(20):
            await asyncio.sleep(0.05)
            peak = max(peak, held_answers.held)

    assert peak <= budget
    first, *later = [await read_until_closed(reader) for reader, _ in clients]
    assert len(first) < size  # the one paused longest was cut; today every client gets all of it
    assert len(later[-1]) > size  # the last is served whole once it reads
    for _, writer in clients:
        writer.close()
