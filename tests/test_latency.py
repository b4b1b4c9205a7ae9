"""`health.latency`: what `hedge_after: auto` learns (the latency sample) and the hedge budget."""

from __future__ import annotations

import pytest

from manaproxy.health.latency import HedgeBudget, LatencySample


def test_the_auto_estimate_is_the_p95_bounded_by_four_medians_and_one_key_holds_a_quarter():
    sample = LatencySample()
    for _ in range(19):
        sample.add(0.1)
    assert sample.estimate() is None  # under 20 answers
    sample.add(0.1)
    assert sample.estimate() == 0.1
    for _ in range(12):
        sample.add(8.0)  # past the p95, not the median
    assert sample.estimate() == pytest.approx(0.4)
    for _ in range(168):
        sample.add(0.1)  # a full window of 200
    for _ in range(300):
        sample.add(0.001, b"one key")
    assert len(sample) == 200  # that key holds at most a quarter of it: 50 (the oldest 50 made room)
    assert sample.estimate() == 0.1  # the others' p95, not the flood's 0.001


@pytest.mark.parametrize(
    ("percent", "requests", "hedges"),
    [(10, 40, 4), (10, 5, 1), (0, 100, 0), (50, 10, 9), (2.5, 40, 1), (100, 30, 30)],
)
def test_the_hedge_budget_allows_percent_of_requests_plus_its_reserve(percent, requests, hedges):
    budget = HedgeBudget(percent)
    spent = 0
    for _ in range(requests):  # every request late: each asks for a hedge
        budget.earn()
        spent += budget.spend()
    assert spent == hedges
