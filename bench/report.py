"""Turning trials into the figures `make bench` prints: medians, ratios, markdown tables.

Pure: no I/O. Every figure is the median over trials of that figure (not a figure of medians), and
throughput carries its spread over trials, (max - min) / median, so a noisy run shows as one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Trial = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    stream: bool
    tokens: int  # answer length of the upstream it uses
    concurrency: int


def aggregate(trials: Sequence[Trial]) -> dict[str, Any]:
    """Median of every numeric field over `trials`, plus the spread of `rps` and summed error counts."""
    keys = {k for t in trials for k, v in t.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    median: dict[str, Any] = {}
    for key in sorted(keys):
        values = [float(t[key]) for t in trials if key in t and not math.isnan(float(t[key]))]
        median[key] = statistics.median(values) if values else math.nan
    rps = [float(t["rps"]) for t in trials if "rps" in t]
    median["rps_spread_pct"] = 100 * (max(rps) - min(rps)) / statistics.median(rps) if rps and min(rps) > 0 else 0.0
    median["errors"] = sum(int(t.get("errors", 0)) for t in trials)
    errors = [str(t["last_error"]) for t in trials if t.get("last_error")]
    median["last_error"] = errors[-1] if errors else ""
    return median


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _added(value: float, base: float | None) -> str:
    if base is None or math.isnan(value) or math.isnan(base):
        return "—"
    return f"{value - base:+.2f} ms"


def _ratio(value: float, base: float | None) -> str:
    if base is None or not base or math.isnan(value) or math.isnan(base):
        return "—"
    return f"{value / base:.2f}×"


def _cpu(stats: Mapping[str, Any], key: str) -> str:
    value = stats.get(key)
    return "—" if value is None or math.isnan(value) else f"{value:,.0f} µs"


def scenario_table(scenario: Scenario, by_target: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table of one scenario: one row per target, ratios against `direct`."""
    direct = by_target.get("direct")
    lines = [f"### {scenario.name}: {scenario.title}", ""]
    if scenario.stream:
        lines += [
            "| target | streams/s | chunks/s | × direct | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms"
            " | TTFB added | proxy CPU/chunk | proxy CPU/stream | upstream CPU/stream | proxy core |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| target | req/s | × direct | p50 ms | p90 ms | p99 ms | p50 added | proxy CPU/req | upstream CPU/req"
            " | proxy core |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for name, stats in by_target.items():
        base = direct if name != "direct" else None
        rps = f"{_num(stats['rps'])} ±{stats['rps_spread_pct']:.0f}%"
        core = "—" if math.isnan(stats.get("proxy_core_pct", math.nan)) else f"{stats['proxy_core_pct']:.0f}%"
        if scenario.stream:
            row = [
                name,
                rps,
                _num(stats["events_per_s"]),
                _ratio(stats["events_per_s"], base["events_per_s"] if base else None),
                _ms(stats["ttfb_p50_ms"]),
                _ms(stats["ttfb_p99_ms"]),
                _ms(stats["p50_ms"]),
                _ms(stats["p99_ms"]),
                _added(stats["ttfb_p50_ms"], base["ttfb_p50_ms"] if base else None),
                _cpu(stats, "proxy_us_per_event"),
                _cpu(stats, "proxy_us_per_req"),
                _cpu(stats, "upstream_us_per_req"),
                core,
            ]
        else:
            row = [
                name,
                rps,
                _ratio(stats["rps"], base["rps"] if base else None),
                _ms(stats["p50_ms"]),
                _ms(stats["p90_ms"]),
                _ms(stats["p99_ms"]),
                _added(stats["p50_ms"], base["p50_ms"] if base else None),
                _cpu(stats, "proxy_us_per_req"),
                _cpu(stats, "upstream_us_per_req"),
                core,
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    mana, lite = by_target.get("manaproxy"), by_target.get("litellm")
    if mana and lite:
        key = "events_per_s" if scenario.stream else "rps"
        lat = "ttfb_p50_ms" if scenario.stream else "p50_ms"
        lines += [
            f"manaproxy vs LiteLLM: {_ratio(mana[key], lite[key])} the throughput, "
            f"{_ratio(mana[lat], lite[lat])} the {'TTFB' if scenario.stream else 'latency'} p50, "
            f"{_ratio(mana.get('proxy_us_per_req', math.nan), lite.get('proxy_us_per_req'))} the CPU per request.",
            "",
        ]
    for name, stats in by_target.items():
        if stats["errors"]:
            lines += [
                f"**{name}: {stats['errors']} failed requests** (last: {stats['last_error'] or 'HTTP error'})",
                "",
            ]
    return lines


def added_latency_lines(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The headline: what a proxy adds to one request when nothing else is queued (1 client)."""
    lines = ["### Added latency per request (1 client, medians)", ""]
    pairs = (
        ("chat-c1", "p50_ms", "unstreamed, total time"),
        ("stream50-c1", "p50_ms", "streamed 50 tokens, total time"),
        ("stream50-c1", "ttfb_p50_ms", "streamed 50 tokens, time to first byte"),
    )
    for scenario, key, label in pairs:
        by_target = results.get(scenario)
        if not by_target or "direct" not in by_target:
            continue
        base = by_target["direct"][key]
        parts = [f"direct {_ms(base)} ms"]
        parts += [f"{n} {_added(s[key], base)}" for n, s in by_target.items() if n != "direct"]
        lines.append(f"- {label}: " + ", ".join(parts))
    return [*lines, ""]


def overhead_table(histograms: Mapping[str, Mapping[str, float]]) -> list[str]:
    """manaproxy's own `mana_llm_proxy_overhead_seconds`, per scenario (from /metrics deltas)."""
    lines = [
        "### manaproxy's own overhead histogram (`mana_llm_proxy_overhead_seconds`)",
        "",
        "| scenario | requests | mean | ≈p50 | ≈p90 | ≈p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in histograms.items():
        lines.append(
            f"| {name} | {s['count']:,.0f} | {_num(s['mean_us'])} µs | {_num(s['p50_us'])} µs"
            f" | {_num(s['p90_us'])} µs | {_num(s['p99_us'])} µs |"
        )
    return [*lines, ""]


def profile_lines(summary: Mapping[str, Any], scenario: str) -> list[str]:
    lines = [
        f"### Profile: manaproxy under {scenario} (py-spy, {summary['samples']:,} busy samples)",
        "",
        f"Event-loop thread only ({summary['other_thread_samples']:,} samples of other, idle threads left out). "
        f"Samples with a manaproxy handler frame on the stack: {summary['own_on_stack_pct']}%. "
        "By package of the sampled frame: " + ", ".join(f"{k} {v}%" for k, v in summary["by_layer_pct"].items()),
        "",
        "| manaproxy function | inclusive | self |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{f['function']}` | {f['inclusive_pct']}% | {f['self_pct']}% |" for f in summary["functions"]]
    lines += ["", "| deepest manaproxy line | calls into | share |", "|---|---|---:|"]
    lines += [f"| `{x['line']}` | `{x['calls']}` | {x['pct']}% |" for x in summary["lines"]]
    return [*lines, ""]
