"""`readtimer.LazyReadTimeout`: the upstream session's read timeout (a stream's idle bound) keeps one timer per
connection, moved by the bytes that arrive, and still fires once none has come for the timeout. Real
sessions (`app.make_session`) against a real fake upstream; the idle bound end to end is in
test_streaming.py."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from manaproxy.app import make_session
from manaproxy.readtimer import LazyReadTimeout

from .fakes import sse_reply


async def open_stream(session: aiohttp.ClientSession, url: str, timeout: float) -> aiohttp.ClientResponse:
    resp = await session.post(url + "/chat/completions", json={"model": "m", "stream": True})
    protocol = resp.connection.protocol if resp.connection is not None else None
    assert isinstance(protocol, LazyReadTimeout)
    protocol.read_timeout = timeout  # as OpenAIProvider arms a stream's idle bound at the commit
    protocol.start_timeout()
    return resp


async def read_to_end(resp: aiohttp.ClientResponse) -> None:
    async with asyncio.timeout(3):
        while await resp.content.readany():
            pass


async def test_chunks_move_one_deadline_instead_of_making_a_timer_each(make_upstream):
    up = await make_upstream("up")
    up.default = sse_reply([{"n": index} for index in range(20)], delay=0.01)
    session = make_session()
    try:
        resp = await open_stream(session, up.base_url, timeout=0.15)
        protocol = resp.connection.protocol  # type: ignore[union-attr]
        timers = {id(protocol._read_timeout_handle)}
        started = time.monotonic()
        while await resp.content.readany():
            if protocol._read_timeout_handle is not None:
                timers.add(id(protocol._read_timeout_handle))
        # 20 chunks over ≈0.2 s, longer than the timeout: the one timer re-armed itself once or twice, no more
        # (aiohttp's own protocol makes a new timer for every chunk), and never fired.
        assert time.monotonic() - started > 0.15
        assert len(timers) <= 3
        resp.close()
    finally:
        await session.close()


async def test_the_deadline_still_fires_after_the_timeout_without_bytes(make_upstream):
    up = await make_upstream("up")
    up.default = sse_reply([{"n": 1}, {"n": 2}], hang_after=1)
    session = make_session()
    try:
        resp = await open_stream(session, up.base_url, timeout=0.2)
        assert b'"n":1' in await resp.content.readany()
        last = time.monotonic()
        with pytest.raises(aiohttp.SocketTimeoutError):
            await read_to_end(resp)
        assert 0.19 <= time.monotonic() - last < 1.0
        resp.close()
    finally:
        await session.close()
