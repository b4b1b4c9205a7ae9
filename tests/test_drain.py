"""`drain.py`'s bookkeeping, as units: `requests_ended` waits for the requests in flight when it is asked, only."""

from __future__ import annotations

import asyncio

from manaproxy.drain import Drain


async def test_requests_ended_waits_for_the_requests_in_flight_and_not_for_later_ones():
    drain = Drain()
    assert drain.requests_ended().done()  # none in flight

    first, second, later = drain.guard(), drain.guard(), drain.guard()
    await first.__aenter__()
    await second.__aenter__()
    ended = drain.requests_ended()
    await later.__aenter__()  # starts after the question: not waited for

    await first.__aexit__(None, None, None)
    assert not ended.done()
    await second.__aexit__(None, None, None)
    assert ended.done()
    assert drain.in_flight == 1
    await later.__aexit__(None, None, None)


async def test_a_waiter_that_gave_up_is_forgotten():
    drain = Drain()
    guard = drain.guard()
    await guard.__aenter__()
    waiter = asyncio.ensure_future(drain.requests_ended())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0)

    await guard.__aexit__(None, None, None)  # resolves nothing cancelled, raises nothing

    assert drain._waiters == []
