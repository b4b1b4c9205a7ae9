"""bench/goals.py: the issue's performance targets as ratios manaproxy ÷ bare, their per-trial range and verdicts."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.goals import GOALS, Goal, evaluate, goals_table, verdict

THROUGHPUT = Goal("throughput", "s", "rps", added=False, at_least=True, bound=0.90, unit="req/s")
ADDED_P50 = Goal("added p50", "s", "p50_ms", added=True, at_least=False, bound=1.15, unit="ms")
CPU = Goal("cpu", "s", "proxy_us_per_event", added=False, at_least=False, bound=1.10, unit="µs")


def _medians(key: str, direct: float, bare: float, mana: float) -> dict[str, Any]:
    return {"s": {"direct": {key: direct}, "bare": {key: bare}, "manaproxy": {key: mana}}}


@pytest.mark.parametrize(
    ("goal", "direct", "bare", "mana", "ratio", "met"),
    [
        (THROUGHPUT, 2000.0, 1000.0, 950.0, 0.95, True),
        (THROUGHPUT, 2000.0, 1000.0, 900.0, 0.90, True),  # the bound itself is met
        (THROUGHPUT, 2000.0, 1000.0, 800.0, 0.80, False),
        # added latency: (manaproxy − direct) ÷ (bare − direct), not manaproxy ÷ bare (1.55 / 1.5 would pass anything)
        (ADDED_P50, 1.0, 1.5, 1.55, 1.10, True),
        (ADDED_P50, 1.0, 1.5, 1.70, 1.40, False),
        (CPU, math.nan, 10.0, 12.0, 1.20, False),  # direct has no proxy CPU: not needed unless `added`
        (CPU, math.nan, 10.0, 9.0, 0.90, True),  # cheaper than the floor is no miss
        (THROUGHPUT, 2000.0, math.nan, 950.0, math.nan, None),  # no figure, no verdict
        (THROUGHPUT, 2000.0, 0.0, 950.0, math.nan, None),  # a bare that served nothing is no base
    ],
)
def test_evaluate_ratio_and_verdict(
    goal: Goal, direct: float, bare: float, mana: float, ratio: float, met: bool | None
) -> None:
    result = evaluate(goal, _medians(goal.key, direct, bare, mana), {})
    assert result is not None
    assert result["ratio"] == pytest.approx(ratio, nan_ok=True)
    assert result["met"] is met
    assert result["figures"]["manaproxy"] == pytest.approx(mana - direct if goal.added else mana)


@pytest.mark.parametrize(
    "medians",
    [
        {},  # scenario not run
        {"s": {"direct": {"rps": 1.0}, "manaproxy": {"rps": 1.0}}},  # no bare
        {"s": {"direct": {"rps": 1.0}, "bare": {"rps": 1.0}}},  # no manaproxy
    ],
)
def test_evaluate_needs_bare_and_manaproxy(medians: dict[str, Any]) -> None:
    assert evaluate(THROUGHPUT, medians, {}) is None


def test_trial_ratios_pair_the_targets_of_one_trial() -> None:
    """Trial i of manaproxy against trial i of bare (minus trial i of direct), as far as all three ran."""
    trials = {
        "s": {
            "direct": [{"p50_ms": 1.0}, {"p50_ms": 2.0}, {"p50_ms": 1.0}],
            "bare": [{"p50_ms": 2.0}, {"p50_ms": 2.0}, {"p50_ms": 3.0}, {"p50_ms": 9.0}],
            "manaproxy": [{"p50_ms": 3.0}, {"p50_ms": 5.0}, {"p50_ms": 3.0}, {"p50_ms": 9.0}],
        }
    }
    result = evaluate(ADDED_P50, _medians("p50_ms", 1.0, 2.0, 3.0), trials)
    assert result is not None
    # trial 2: bare − direct = 0, no ratio; trial 4: no direct.
    assert result["trial_ratios"] == [pytest.approx(2.0), pytest.approx(1.0)]


@pytest.mark.parametrize(
    ("met", "ratio", "bound", "at_least", "text"),
    [
        (None, math.nan, 0.9, True, "—"),
        (True, 0.95, 0.9, True, "met"),
        (False, 0.80, 0.9, True, "**missed** by 0.10"),
        (False, 1.40, 1.15, False, "**missed** by 0.25"),
    ],
)
def test_verdict(met: bool | None, ratio: float, bound: float, at_least: bool, text: str) -> None:
    assert verdict(met, ratio, bound, at_least) == text


def test_goals_table_has_a_row_per_goal_measured() -> None:
    medians = {
        "chat-c32": {"direct": {"rps": 3000.0}, "bare": {"rps": 2000.0}, "manaproxy": {"rps": 1000.0}},
        "stream50-c32": {"bare": {"rps": 100.0}},  # no manaproxy: no row
    }
    lines, results = goals_table(medians, {}, {})
    rows = [line for line in lines if line.startswith("| unstreamed throughput")]
    assert rows == [
        "| unstreamed throughput, 32 connections | chat-c32 | 3,000 | 2,000 | 1,000 | — | 0.50 | — | ≥ 0.90 "
        "| **missed** by 0.40 |"
    ]
    assert [r["label"] for r in results] == [GOALS[0].label]


@pytest.mark.parametrize(
    ("idle", "met", "cell"),
    [
        ({"bare": 20.0, "manaproxy": 45.0}, True, "| 2.25 | — | ≤ 50 MB | met |"),
        ({"bare": 20.0, "manaproxy": 60.0}, False, "| 3.00 | — | ≤ 50 MB | **missed** by 10.0 MB |"),
        ({"bare": 20.0}, None, "| — | — | ≤ 50 MB | — |"),
    ],
)
def test_idle_rss_is_an_absolute_target(idle: dict[str, float], met: bool | None, cell: str) -> None:
    lines, results = goals_table({}, {}, idle)
    (row,) = [line for line in lines if line.startswith("| idle RSS")]
    assert row.endswith(cell)
    assert results[-1]["met"] is met


@pytest.mark.parametrize(
    ("mana_errors", "after_over_idle", "errors_met", "rss_met"),
    [(0, 1.05, True, True), (3, 1.05, False, True), (0, 1.20, True, False)],
)
def test_scale_rows(mana_errors: int, after_over_idle: float, errors_met: bool, rss_met: bool) -> None:
    scale = {
        "streams": 1000,
        "targets": {
            "direct": {"errors": 0, "ttft_p99_ms": 10.0},
            "bare": {"errors": 0, "ttft_p99_ms": 14.0, "rss_after_over_idle": 1.0},
            "manaproxy": {"errors": mana_errors, "ttft_p99_ms": 18.0, "rss_after_over_idle": after_over_idle},
        },
    }
    _, results = goals_table({}, {}, {}, scale)
    by_label = {r["label"]: r for r in results}
    assert by_label["scale errors"]["met"] is errors_met
    assert by_label["scale added TTFT p99"]["figures_ms"] == {"bare": 4.0, "manaproxy": 8.0}
    assert by_label["scale added TTFT p99"]["ratio"] == pytest.approx(2.0)
    assert by_label["scale RSS after / idle"]["met"] is rss_met


@pytest.mark.parametrize(("workers_us", "met", "cell"), [(55.0, True, "met"), (70.0, False, "**missed** by 0.20")])
def test_scale_cpu_per_relayed_event_per_manaproxy_target(workers_us: float, met: bool, cell: str) -> None:
    wave = {"errors": 0, "ttft_p99_ms": 12.0}
    scale = {
        "streams": 1000,
        "targets": {
            "direct": wave,
            "bare": {**wave, "proxy_us_per_event": 50.0},
            "manaproxy": {**wave, "proxy_us_per_event": 75.0},
            "manaproxy-wauto": {**wave, "proxy_us_per_event": workers_us},
        },
    }
    lines, results = goals_table({}, {}, {}, scale)
    by_label = {r["label"]: r for r in results}
    assert by_label["scale CPU per relayed event"]["ratio"] == pytest.approx(1.5)
    assert by_label["scale CPU per relayed event"]["met"] is False
    workers = by_label["scale CPU per relayed event (manaproxy-wauto)"]
    assert workers["ratio"] == pytest.approx(workers_us / 50.0)
    assert workers["met"] is met
    (row,) = [line for line in lines if line.startswith("| CPU per relayed event (manaproxy-wauto) |")]
    assert row.rstrip(" |").endswith(cell)
