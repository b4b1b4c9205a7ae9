"""SIGTERM: the drain lasts `server.shutdown_timeout_seconds` at most, and whatever it must cut ends
cleanly — a stream with an error event and a proper end of body, an unanswered request with a 503."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import orjson

from .fakes import hang, wait_for
from .helpers import CHAT, build_config, chat, raw_post, split_response
from .processes import gated_stream

DRAIN = 0.5


async def test_a_stream_still_running_when_the_drain_ends_gets_an_error_event_and_a_clean_end(make_upstream, serve):
    up = await make_upstream("up")
    up.default = gated_stream(asyncio.Event())  # never released: the stream would run forever
    process = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server={"shutdown_timeout_seconds": DRAIN}))

    async with aiohttp.ClientSession() as session:
        resp = await session.post(process.url + CHAT, json=chat("mana/a", stream=True))
        await resp.content.readuntil(b"\n\n")
        signalled = time.monotonic()
        process.signal(signal.SIGTERM)
        rest = await resp.content.read()  # raises ClientPayloadError on a broken chunked body
        resp.release()
        code = await process.wait_exit()
    took = time.monotonic() - signalled

    *_, last = [event for event in rest.split(b"\n\n") if event]
    assert orjson.loads(last.removeprefix(b"data: "))["error"]["code"] == "shutting_down"
    assert b"[DONE]" not in rest
    assert code == 0
    assert DRAIN <= took < DRAIN + 2.0  # aiohttp alone took twice the setting, then cut the body
    assert process.lines_with("ending 1 requests still in flight")
    (line,) = process.lines_with("request_id=")
    assert "outcome=shutting_down" in line


async def test_a_request_not_yet_answered_when_the_drain_ends_gets_a_503(make_upstream, serve):
    up = await make_upstream("up")
    up.default = hang()
    process = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server={"shutdown_timeout_seconds": DRAIN}))

    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.post(process.url + CHAT, json=chat("mana/a")))
        await wait_for(lambda: bool(up.requests))
        process.signal(signal.SIGTERM)
        resp = await pending
        body = await resp.json()

    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert body["error"]["code"] == "shutting_down"
    assert await process.wait_exit() == 0


async def test_a_request_arriving_on_an_open_connection_while_draining_is_refused(make_upstream, serve):
    up = await make_upstream("up")
    up.queue(gated_stream(asyncio.Event()))
    process = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server={"shutdown_timeout_seconds": 2}))
    request = raw_post(CHAT, orjson.dumps(chat("mana/a"))).replace(b"Connection: close", b"Connection: keep-alive")

    async with aiohttp.ClientSession() as session:
        held = await session.post(process.url + CHAT, json=chat("mana/a", stream=True))  # keeps the drain busy
        await held.content.readuntil(b"\n\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")  # a first answer: the connection is now kept alive
        await reader.readexactly(int(split_response(head)[1]["content-length"]))
        process.signal(signal.SIGTERM)
        await process.wait_line(lambda text: "stopping" in text)
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        held.release()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503")
    assert orjson.loads(body)["error"]["code"] == "shutting_down"


async def test_the_drain_takes_about_its_timeout_not_twice_it(make_upstream, serve):
    drain = 3.0  # long enough that twice it stands apart from the moments a loaded machine adds
    up = await make_upstream("up")
    up.default = hang()
    process = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server={"shutdown_timeout_seconds": drain}))

    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.post(process.url + CHAT, json=chat("mana/a")))
        await wait_for(lambda: bool(up.requests))
        signalled = time.monotonic()
        process.signal(signal.SIGTERM)
        resp = await pending
        answered = time.monotonic() - signalled
        await resp.read()
        code = await process.wait_exit()
    exited = time.monotonic() - signalled

    assert resp.status == 503
    assert code == 0
    assert drain - 0.1 <= answered < 1.5 * drain  # cut when the drain time is up
    (line,) = process.lines_with("stopped after draining for")
    assert float(line.rsplit("for ", 1)[1].split("s")[0]) < drain + 1.0  # as the process itself measured it
    assert exited < 1.75 * drain
