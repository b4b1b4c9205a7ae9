"""The one Redis link (redislink.py) against a real `redis-server` of the test's own: what a slow command costs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from manaproxy.config import RedisSettings
from manaproxy.redislink import DEGRADED, DOWN_AFTER_TIMEOUTS, RedisLink

from .fakes import wait_for
from .processes import RedisServer

pytestmark = pytest.mark.timeout(20)


@contextlib.asynccontextmanager
async def stored(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    """A link whose commands time out after 50 ms, connected, with `k` = `v` stored (on a loaded machine the
    first connection may take longer than 50 ms: it is tried again), its errors counted from zero."""
    link = RedisLink()
    link.open(RedisSettings(url=redis_server.url, timeout_seconds=0.05))
    try:
        for _ in range(20):
            if await link.run("setup", lambda client: client.set("k", b"v")) is True:
                break
        else:
            pytest.fail("redis-server did not answer a SET within 50 ms in 20 tries")
        link.errors.clear()
        yield link
    finally:
        await link.close()


async def test_a_timed_out_command_costs_that_command_only(redis_server, caplog):
    caplog.set_level(logging.DEBUG, logger="manaproxy.redis")
    async with stored(redis_server) as link:
        redis_server.pause()  # answers nothing: the next command times out
        try:
            assert await link.run("cache", lambda client: client.get("k")) is DEGRADED
            assert link.up, link  # a slow answer is not an outage
        finally:
            redis_server.resume()
        assert await link.run("limits", lambda client: client.get("k")) == b"v"  # another feature, at once
        assert link.errors == {"cache": 1}
        assert await link.run("cache", lambda client: client.get("k")) == b"v"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_commands_timing_out_in_a_row_mark_the_link_down_until_redis_answers_again(redis_server, caplog):
    async with stored(redis_server) as link:
        redis_server.pause()  # answers nothing, as a network that drops packets
        try:
            for _ in range(DOWN_AFTER_TIMEOUTS - 1):
                assert await link.run("cache", lambda client: client.get("k")) is DEGRADED
            assert link.up  # slow answers so far
            assert await link.run("limits", lambda client: client.get("k")) is DEGRADED
            assert not link.up  # gone: the next commands degrade without waiting for their timeout
            assert await link.run("cache", lambda client: client.get("k")) is DEGRADED
            assert link.errors == {"cache": DOWN_AFTER_TIMEOUTS, "limits": 1}
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert f"unreachable ({DOWN_AFTER_TIMEOUTS} commands in a row timed out)" in warnings[0]
        finally:
            redis_server.resume()
        await wait_for(lambda: link.up, timeout=5)  # the background ping found it answering
        assert await link.run("cache", lambda client: client.get("k")) == b"v"


async def test_commands_that_time_out_together_in_one_stall_count_once(redis_server, caplog):
    async with stored(redis_server) as link:
        redis_server.pause()  # one stall, with many commands in flight
        try:
            together = [link.run("cache", lambda client: client.get("k")) for _ in range(2 * DOWN_AFTER_TIMEOUTS)]
            assert await asyncio.gather(*together) == [DEGRADED] * (2 * DOWN_AFTER_TIMEOUTS)
            assert link.up, link  # sent before any of them timed out: one slow moment, not an outage
        finally:
            redis_server.resume()
        assert await link.run("cache", lambda client: client.get("k")) == b"v"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_connection_failure_still_marks_the_link_down(redis_server, caplog):
    link = RedisLink()
    link.open(RedisSettings(url=redis_server.url, timeout_seconds=0.5))
    try:
        assert await link.run("cache", lambda client: client.ping()) is True
        redis_server.kill()
        assert await link.run("cache", lambda client: client.ping()) is DEGRADED
        assert not link.up
        assert await link.run("limits", lambda client: client.ping()) is DEGRADED  # at once, without the network
        assert link.errors == {"cache": 1, "limits": 1}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "unreachable" in warnings[0]
        redis_server.start()
        await wait_for(lambda: link.up, timeout=5)
    finally:
        await link.close()
