"""Units of `health/capacity.py`: the learned concurrency limit, driven by hand with a fake clock."""

from __future__ import annotations

import pytest

from manaproxy.config import AutoConcurrency
from manaproxy.health.capacity import (
    FLOOR_WINDOW,
    PER_TOKEN,
    PROBE_HOLD,
    TTFB,
    Capacity,
)

FLOOR = 0.2  # seconds to the first byte of a request that did not queue
QUEUED = 2.0  # ... and of one that waited for a whole answer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self, seconds: float = 0.0) -> float:
        self.now += seconds
        return self.now


def answer(capacity: Capacity, clock: Clock, seconds: float, concurrency: int, signal: str = TTFB) -> None:
    """A request started now with `concurrency` in flight answers `seconds` later."""
    started = clock()
    capacity.observe(signal, seconds, started=started, concurrency=concurrency, now=clock(seconds))


def at_limit(capacity: Capacity, clock: Clock, seconds: float, times: int) -> None:
    for _ in range(times):
        answer(capacity, clock, seconds, capacity.allowed)


def test_starts_at_its_minimum():
    assert Capacity(AutoConcurrency()).allowed == 1
    assert Capacity(AutoConcurrency(min_concurrent=3)).allowed == 3


def test_grows_while_answers_stay_at_the_floor_and_the_limit_is_reached():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    at_limit(capacity, clock, FLOOR, 1 + 2 + 3)  # one limit's worth of answers at the limit per step
    assert capacity.allowed == 4
    assert repr(capacity) == "<Capacity limit=4.00 allowed=4 ceiling=None>"


def test_an_answer_under_the_limit_says_nothing_about_it():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    at_limit(capacity, clock, FLOOR, 3)
    before = capacity.limit
    for _ in range(20):
        answer(capacity, clock, FLOOR, 1)  # a quiet target
    assert capacity.limit == before == 3.0


@pytest.mark.parametrize(
    ("allowed", "after"),
    [(2, 1), (4, 3), (5, 4), (8, 6), (64, 48)],
    ids=["2-1", "4-3", "5-4", "8-6", "64-48"],
)
def test_a_queued_answer_shrinks_the_limit_by_one_or_a_quarter(allowed, after):
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    answer(capacity, clock, FLOOR, 1)
    capacity.limit = float(allowed)
    answer(capacity, clock, QUEUED, allowed)
    assert (capacity.allowed, capacity.ceiling) == (after, allowed)


def test_one_decrease_per_round_trip():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    answer(capacity, clock, FLOOR, 1)
    capacity.limit = 8.0
    burst = [clock(0.001) for _ in range(6)]  # six requests sent under the old limit
    for started in burst:
        capacity.observe(TTFB, QUEUED, started=started, concurrency=8, now=clock(0.5))
    assert capacity.allowed == 6  # they queued behind the same limit: it shrinks once
    answer(capacity, clock, QUEUED, 6)  # one sent after the decrease queues too: again
    assert capacity.allowed == 5


def test_a_small_rise_within_the_tolerance_is_no_queue():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    at_limit(capacity, clock, FLOOR, 4)
    answer(capacity, clock, FLOOR * 1.9, 3)
    assert capacity.allowed == 3


def test_bounds_hold():
    capacity, clock = Capacity(AutoConcurrency(min_concurrent=2, max_concurrent_limit=3)), Clock()
    at_limit(capacity, clock, FLOOR, 50)
    assert capacity.allowed == 3
    for _ in range(10):
        answer(capacity, clock, QUEUED, 3)
    assert capacity.allowed == 2


def test_the_ceiling_is_tried_again_only_after_the_hold():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    answer(capacity, clock, FLOOR, 1)
    capacity.limit = 5.0
    answer(capacity, clock, QUEUED, 5)  # the fifth queued: capacity 4
    at_limit(capacity, clock, FLOOR, 20)
    assert (capacity.allowed, capacity.ceiling) == (4, 5)
    clock(PROBE_HOLD)
    at_limit(capacity, clock, FLOOR, 1)
    assert (capacity.allowed, capacity.ceiling) == (5, None)


def test_the_floor_is_re_measured_so_a_slower_target_is_not_starved():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    at_limit(capacity, clock, FLOOR, 4)
    for _ in range(4):  # the GPU got three times slower: everything looks queued for a while
        answer(capacity, clock, 3 * FLOOR, capacity.allowed)
    assert capacity.allowed == 1
    clock(max(2 * FLOOR_WINDOW, PROBE_HOLD))
    at_limit(capacity, clock, 3 * FLOOR, 1 + 2)  # the old best aged out: the new time is the floor
    assert capacity.floor(TTFB, clock()) == pytest.approx(3 * FLOOR)
    assert capacity.allowed == 3


def test_each_signal_has_its_own_floor():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    answer(capacity, clock, FLOOR, 1)
    answer(capacity, clock, 0.02, 1, PER_TOKEN)
    answer(capacity, clock, 0.03, 1, PER_TOKEN)  # 1.5 x its own floor: no queue (it is far under TTFB's)
    assert (capacity.floor(TTFB, clock()), capacity.floor(PER_TOKEN, clock())) == (FLOOR, 0.02)
    assert capacity.allowed == 2


def test_rebound_keeps_what_was_learned_within_the_new_bounds():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    at_limit(capacity, clock, FLOOR, 7)
    capacity.rebound(AutoConcurrency(max_concurrent_limit=2))
    assert capacity.allowed == 2
    capacity.rebound(AutoConcurrency(min_concurrent=5, max_concurrent_limit=8))
    assert capacity.allowed == 5


def test_a_slow_answer_that_had_the_target_to_itself_is_no_queue():
    capacity, clock = Capacity(AutoConcurrency()), Clock()
    answer(capacity, clock, FLOOR, 1)
    answer(capacity, clock, QUEUED, 1)  # alone and slow: a long prompt, or another user of the GPU
    assert capacity.ceiling is None
    at_limit(capacity, clock, FLOOR, 1 + 2)
    assert capacity.allowed == 3  # nothing held it at 1
    answer(capacity, clock, QUEUED, 2)  # with another of ours in flight: it may have queued behind it
    assert (capacity.allowed, capacity.ceiling) == (2, 3)
