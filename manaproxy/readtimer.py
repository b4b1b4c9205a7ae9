"""The upstream connections' read timeout (`sock_read`, a stream's idle bound), re-armed lazily.

aiohttp's client protocol cancels its read timer and schedules a new one for every chunk that arrives: a
relayed stream event costs a timer handle made, a cancelled one left in the loop's heap, and two heap
operations — at 10,000 streams of 10 events a second, 100,000 of each per second. `LazyReadTimeout` keeps
one deadline per connection instead: a chunk only moves it (`loop.time() + timeout`, a float), and the one
timer, when it fires before the deadline, re-arms itself for it. The bound means the same: the timeout fires
once no byte has arrived for `timeout` seconds (never sooner; later only by the loop's own lag), and reading
paused for a slow client stops it as aiohttp's does (its `pause_reading` drops the timer).

Rule of this module: it changes when the timer is scheduled, nothing else; aiohttp's `_on_read_timeout`
still ends the read. It relies on aiohttp's `_reschedule_timeout` / `_read_timeout_handle` and the
connector's protocol factory (`_factory`); tests/test_readtimer.py pins both.
"""

from __future__ import annotations

import asyncio
import functools

import aiohttp
from aiohttp.client_proto import ResponseHandler

# A timer that fires this close to its deadline counts as on time (uvloop's timers have millisecond ticks).
_TICK = 0.001


class LazyReadTimeout(ResponseHandler):
    """aiohttp's client protocol with one read deadline per connection (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._read_deadline = 0.0

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        self._read_deadline = deadline = self._loop.time() + timeout
        handle = self._read_timeout_handle
        if handle is not None and handle.when() <= deadline:
            return  # armed already, for no later than the deadline: it re-arms itself when it fires
        if handle is not None:
            handle.cancel()  # a shorter timeout than the one armed
        self._read_timeout_handle = self._loop.call_at(deadline, self._read_deadline_reached)

    def _read_deadline_reached(self) -> None:
        self._read_timeout_handle = None
        if self._read_deadline - self._loop.time() > _TICK:  # bytes came since it was armed
            self._read_timeout_handle = self._loop.call_at(self._read_deadline, self._read_deadline_reached)
            return
        self._on_read_timeout()


def lazy_read_timeouts(connector: aiohttp.BaseConnector) -> aiohttp.BaseConnector:
    """`connector`, its new connections made with `LazyReadTimeout`."""
    connector._factory = functools.partial(LazyReadTimeout, loop=connector._loop)  # type: ignore[assignment]
    return connector
