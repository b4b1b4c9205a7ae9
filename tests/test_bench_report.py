"""bench/report.py: trials → medians (every figure the median over trials), and the markdown `make bench` prints."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.report import Scenario, added_latency_lines, aggregate, overhead_table, scale_lines, scenario_table

UNSTREAMED = Scenario("chat-c1", "unstreamed, 1 client", stream=False, tokens=50, concurrency=1)
STREAMED = Scenario("stream50-c32", "streamed, 32 clients", stream=True, tokens=50, concurrency=32)


@pytest.mark.parametrize(
    ("trials", "expected"),
    [
        # the median of each figure over trials, not a figure of medians
        ([{"rps": 90.0, "p50_ms": 9.0}, {"rps": 100.0, "p50_ms": 1.0}, {"rps": 200.0, "p50_ms": 2.0}],
         {"rps": 100.0, "p50_ms": 2.0, "rps_spread_pct": 110.0}),
        # NaN (a figure that does not apply to a trial) is left out, not propagated
        ([{"rps": 10.0, "ttfb": math.nan}, {"rps": 10.0, "ttfb": 4.0}], {"ttfb": 4.0, "rps_spread_pct": 0.0}),
        ([{"rps": 10.0, "ttfb": math.nan}], {"ttfb": math.nan}),
        # a trial that served nothing: no spread to speak of
        ([{"rps": 0.0}, {"rps": 10.0}], {"rps": 5.0, "rps_spread_pct": 0.0}),
        # errors are summed over trials; the last error named is kept
        ([{"errors": 2, "last_error": "HTTP 502"}, {"errors": 0, "last_error": ""}, {"errors": 1, "last_error": ""}],
         {"errors": 3, "last_error": "HTTP 502"}),
        ([{"errors": 1, "last_error": "a"}, {"errors": 1, "last_error": "b"}], {"errors": 2, "last_error": "b"}),
    ],
)  # fmt: skip
def test_aggregate(trials: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    result = aggregate(trials)
    for key, value in expected.items():
        assert result[key] == (value if isinstance(value, str) else pytest.approx(value, nan_ok=True)), key


def test_aggregate_leaves_out_flags() -> None:
    assert "pinned" not in aggregate([{"rps": 1.0, "pinned": True}])


def _stats(**figures: float) -> dict[str, Any]:
    return {"errors": 0, "last_error": "", "rps_spread_pct": 0.0, **figures}


def test_unstreamed_row_reads_against_direct_and_bare() -> None:
    by_target = {
        "direct": _stats(rps=2000.0, p50_ms=0.5, p90_ms=0.6, p99_ms=1.0),
        "bare": _stats(rps=1000.0, p50_ms=1.0, p90_ms=1.2, p99_ms=2.0, proxy_us_per_req=100.0),
        "manaproxy": _stats(
            rps=800.0, p50_ms=1.25, p90_ms=1.5, p99_ms=12.5, proxy_us_per_req=150.0, proxy_core_pct=97.0
        ),
    }
    lines = scenario_table(UNSTREAMED, by_target)
    assert lines[0] == "### chat-c1: unstreamed, 1 client"
    (mana,) = [line for line in lines if line.startswith("| manaproxy ")]
    cells = [cell.strip() for cell in mana.strip("|").split("|")]
    assert cells[:9] == ["manaproxy", "800 ±0%", "0.40×", "0.80×", "1.25", "1.50", "12.5", "+0.75 ms", "+11.50 ms"]
    assert cells[9:12] == ["150 µs", "1.50×", "—"]
    assert cells[12] == "97%"
    (direct,) = [line for line in lines if line.startswith("| direct ")]
    assert "| — | — |" in direct  # direct is not read against itself, nor against bare


def test_streamed_row_charges_cpu_per_chunk() -> None:
    by_target = {
        "bare": _stats(
            rps=100.0, events_per_s=5000.0, ttfb_p50_ms=1.0, ttfb_p99_ms=2.0, p50_ms=5.0, p99_ms=9.0,
            proxy_us_per_event=10.0,
        ),
        "manaproxy": _stats(
            rps=100.0, events_per_s=5000.0, ttfb_p50_ms=1.0, ttfb_p99_ms=2.0, p50_ms=5.0, p99_ms=9.0,
            proxy_us_per_event=12.0,
        ),
    }  # fmt: skip
    (mana,) = [line for line in scenario_table(STREAMED, by_target) if line.startswith("| manaproxy ")]
    cells = [cell.strip() for cell in mana.strip("|").split("|")]
    assert cells[2] == "5,000"
    assert cells[10:12] == ["12 µs", "1.20×"]


def test_failed_requests_are_called_out() -> None:
    by_target = {"manaproxy": {**_stats(rps=1.0, p50_ms=1.0, p90_ms=1.0, p99_ms=1.0), "errors": 3}}
    lines = scenario_table(UNSTREAMED, by_target)
    assert "**manaproxy: 3 failed requests** (last: HTTP error)" in lines


def test_no_ratio_to_a_base_that_served_nothing() -> None:
    figures = {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0}
    by_target = {"direct": _stats(rps=0.0, **figures), "manaproxy": _stats(rps=10.0, **figures)}
    (mana,) = [line for line in scenario_table(UNSTREAMED, by_target) if line.startswith("| manaproxy ")]
    assert mana.startswith("| manaproxy | 10 ±0% | — |")


def test_litellm_is_compared_when_it_ran() -> None:
    figures = {"p50_ms": 2.0, "p90_ms": 2.0, "p99_ms": 2.0, "proxy_us_per_req": 100.0}
    by_target = {"manaproxy": _stats(rps=300.0, **figures), "litellm": _stats(rps=100.0, **{**figures, "p50_ms": 8.0})}
    lines = scenario_table(UNSTREAMED, by_target)
    assert "manaproxy vs LiteLLM: 3.00× the throughput, 0.25× the latency p50, 1.00× the CPU per request." in lines
    assert not any("LiteLLM" in line for line in scenario_table(UNSTREAMED, {"manaproxy": by_target["manaproxy"]}))


def test_added_latency_is_over_direct() -> None:
    results = {
        "chat-c1": {"direct": {"p50_ms": 0.5}, "bare": {"p50_ms": 0.75}, "manaproxy": {"p50_ms": 1.0}},
        "stream50-c1": {"bare": {"p50_ms": 1.0, "ttfb_p50_ms": 1.0}},  # no direct: no line
    }
    assert added_latency_lines(results) == [
        "### Added latency per request (1 client, medians)",
        "",
        "- unstreamed, total time: direct 0.50 ms, bare +0.25 ms, manaproxy +0.50 ms",
        "",
    ]


def test_overhead_table() -> None:
    summary = {"count": 1234.0, "mean_us": 85.4, "p50_us": 70.0, "p90_us": math.nan, "p99_us": 1500.0}
    assert overhead_table({"chat-c32": summary})[-2] == "| chat-c32 | 1,234 | 85 µs | 70 µs | — µs | 1,500 µs |"


def _scale() -> dict[str, Any]:
    wave = {"ok": 1000, "errors": 0, "events": 30000}
    proxy = {"fds_idle": 20, "fds_peak": 2020, "fds_soon": 30, "fds_after": 21, "rss_after_over_idle": 1.02}
    return {
        "streams": 1000,
        "shortfall": "",
        "settings": {"chunks": 30, "interval_ms": 100.0, "ramp_s": 2.0, "settle_s": 5.0, "nominal_stream_s": 3.0},
        "targets": {
            "direct": {**wave, "ttft_p99_ms": 10.0},
            "bare": {**wave, **proxy, "ttft_p99_ms": 15.0, "proxy_cores": 0.5},
            "manaproxy": {**wave, **proxy, "fds_peak": 1820, "ttft_p99_ms": 20.0, "proxy_cores": 0.75},
        },
    }


@pytest.mark.parametrize(
    ("label", "cells"),
    [
        ("TTFT p99 added over direct", ["—", "+5.0 ms", "+10.0 ms", "2.00×"]),
        ("proxy CPU, cores (wave average)", ["—", "0.50", "0.75", "1.50×"]),
        # open files beyond idle ÷ 2: a proxied stream holds a client and an upstream socket
        ("peak streams inside the proxy (≈ open files beyond idle ÷ 2)", ["—", "1,000", "900", "—"]),
        (
            "proxy open files idle / peak / after +5 s / +5 s",
            ["—", "20 / 2,020 / 30 / 21", "20 / 1,820 / 30 / 21", "—"],
        ),
        ("streams ok", ["1,000", "1,000", "1,000", "—"]),
    ],
)
def test_scale_lines(label: str, cells: list[str]) -> None:
    scale = _scale()
    lines = scale_lines(scale)
    (row,) = [line for line in lines if line.startswith(f"| {label} |")]
    assert [cell.strip() for cell in row.strip("|").split("|")][1:] == cells
    assert "ttft_p99_added_ms" not in scale["targets"]["manaproxy"]  # derived figures go on a copy


def test_scale_shortfall_is_said() -> None:
    scale = {**_scale(), "shortfall": "ran 900 streams"}
    assert "**ran 900 streams**" in scale_lines(scale)


def test_scale_workers_target_gets_a_column_and_a_ratio() -> None:
    scale = _scale()
    workers = {**scale["targets"]["manaproxy"], "proxy_cores": 1.0, "processes": 3, "fds_peak": 2120}
    scale["targets"]["manaproxy-wauto"] = workers
    lines = scale_lines(scale)
    header = next(line for line in lines if line.startswith("| | direct"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == [
        "direct",
        "bare",
        "manaproxy",
        "manaproxy-wauto",
        "manaproxy ÷ bare",
        "manaproxy-wauto ÷ bare",
    ]
    (row,) = [line for line in lines if line.startswith("| proxy CPU, cores (wave average) |")]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["—", "0.50", "0.75", "1.00", "1.50×", "2.00×"]
    (row,) = [line for line in lines if line.startswith("| peak streams inside the proxy")]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["—", "1,000", "900", "1,050", "—", "—"]
