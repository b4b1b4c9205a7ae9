"""The performance targets of the issue, checked against the bare passthrough of the same run.

Pure: no I/O. A target is a ratio manaproxy ÷ bare of one figure of one scenario. The ratio is taken
of the medians over trials (the figures the tables show); for an added latency, of the medians minus
direct's median: (manaproxy − direct) ÷ (bare − direct). Beside it, the range of the same ratio taken
trial by trial (trials run round-robin, so the targets of one trial ran seconds apart): how far the
verdict can be trusted. Idle memory is an absolute target (MB), not a ratio.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Trial = dict[str, Any]
IDLE_RSS_TARGET_MB = 50.0
RSS_AFTER_TARGET = 1.10  # RSS after the scale wave ÷ RSS idle
SCALE_CPU_PER_EVENT_TARGET = 1.2  # manaproxy's CPU per relayed event in the scale wave ÷ bare's (issue 22)


@dataclass(frozen=True, slots=True)
class Goal:
    label: str
    scenario: str
    key: str  # figure of a trial / of the medians
    added: bool  # compare the figure minus direct's (added latency), not the figure itself
    at_least: bool  # the ratio must be ≥ bound (else ≤ bound)
    bound: float
    unit: str


GOALS = (
    Goal("unstreamed throughput, 32 connections", "chat-c32", "rps", False, True, 0.90, "req/s"),
    Goal("added latency p50, 1 client", "chat-c1", "p50_ms", True, False, 1.15, "ms"),
    Goal("added latency p99, 1 client", "chat-c1", "p99_ms", True, False, 1.30, "ms"),
    Goal("streamed throughput (50 chunks), 32 connections", "stream50-c32", "rps", False, True, 0.97, "streams/s"),
    # "Within 10 % of bare's": cheaper than the floor is no miss.
    Goal("proxy CPU per relayed chunk", "stream50-c32", "proxy_us_per_event", False, False, 1.10, "µs"),
)


def _figure(stats: Mapping[str, Any] | None, direct: Mapping[str, Any] | None, goal: Goal) -> float:
    if stats is None:
        return math.nan
    value = float(stats.get(goal.key, math.nan))
    if goal.added:
        value -= float(direct[goal.key]) if direct is not None else math.nan
    return value


def _ratio(mana: float, bare: float) -> float:
    if math.isnan(mana) or math.isnan(bare) or bare <= 0:
        return math.nan
    return mana / bare


def evaluate(
    goal: Goal,
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]],
    trials: Mapping[str, Mapping[str, Sequence[Trial]]],
) -> dict[str, Any] | None:
    """The figures of every target, the ratio manaproxy ÷ bare, its per-trial range and the verdict."""
    by_target = medians.get(goal.scenario)
    if not by_target or "bare" not in by_target or "manaproxy" not in by_target:
        return None
    direct = by_target.get("direct")
    figures = {name: _figure(stats, direct, goal) for name, stats in by_target.items()}
    ratio = _ratio(figures["manaproxy"], figures["bare"])
    runs = trials.get(goal.scenario, {})
    paired = []
    for index in range(min(len(runs.get(name, ())) for name in ("bare", "manaproxy", "direct"))):
        trial_direct = runs["direct"][index]
        paired.append(
            _ratio(
                _figure(runs["manaproxy"][index], trial_direct, goal), _figure(runs["bare"][index], trial_direct, goal)
            )
        )
    paired = [r for r in paired if not math.isnan(r)]
    met = None if math.isnan(ratio) else (ratio >= goal.bound if goal.at_least else ratio <= goal.bound)
    return {
        "label": goal.label,
        "scenario": goal.scenario,
        "figures": figures,
        "ratio": ratio,
        "trial_ratios": paired,
        "bound": goal.bound,
        "at_least": goal.at_least,
        "met": met,
    }


def _fmt(value: float, unit: str, added: bool) -> str:
    if math.isnan(value):
        return "—"
    if unit == "ms":
        return f"{value:+.3f} ms" if added else f"{value:.3f} ms"
    if unit == "µs":
        return f"{value:,.1f} µs"
    return f"{value:,.0f}"


def verdict(met: bool | None, ratio: float, bound: float, at_least: bool) -> str:
    if met is None:
        return "—"
    if met:
        return "met"
    gap = bound - ratio if at_least else ratio - bound
    return f"**missed** by {gap:.2f}"


def goals_table(
    medians: Mapping[str, Mapping[str, Mapping[str, Any]]],
    trials: Mapping[str, Mapping[str, Sequence[Trial]]],
    idle_rss_mb: Mapping[str, float],
    scale: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """The targets of the issue as one markdown table (and as data for the JSON)."""
    lines = [
        "### Targets: manaproxy ÷ bare passthrough, same run",
        "",
        'Ratios of the medians (the verdict); added latencies are over direct\'s. "trials": the same ratio taken '
        "trial by trial, median (min–max); a range that straddles the goal means the verdict is within the noise.",
        "",
        "| target | scenario | direct | bare | manaproxy | litellm | manaproxy ÷ bare | trials | goal | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    results = []
    for goal in GOALS:
        result = evaluate(goal, medians, trials)
        if result is None:
            continue
        results.append(result)
        figs = result["figures"]
        spread = result["trial_ratios"]
        span = "—"
        if len(spread) == 1:
            span = f"{spread[0]:.2f}"
        elif spread:
            span = f"{statistics.median(spread):.2f} ({min(spread):.2f}–{max(spread):.2f})"
        direct = medians[goal.scenario].get("direct", {}).get(goal.key, math.nan)
        row = [
            goal.label,
            goal.scenario,
            "—" if goal.unit == "µs" else _fmt(float(direct), goal.unit, False),
            *(_fmt(figs.get(name, math.nan), goal.unit, goal.added) for name in ("bare", "manaproxy", "litellm")),
            "—" if math.isnan(result["ratio"]) else f"{result['ratio']:.2f}",
            span,
            f"{'≥' if goal.at_least else '≤'} {goal.bound:.2f}",
            verdict(result["met"], result["ratio"], goal.bound, goal.at_least),
        ]
        lines.append("| " + " | ".join(row) + " |")
    if idle_rss_mb:
        mana = idle_rss_mb.get("manaproxy", math.nan)
        ratio = _ratio(mana, idle_rss_mb.get("bare", math.nan))
        met = None if math.isnan(mana) else mana <= IDLE_RSS_TARGET_MB
        cells = [f"{idle_rss_mb[n]:.1f} MB" if n in idle_rss_mb else "—" for n in ("bare", "manaproxy", "litellm")]
        over = "met" if met else "—" if met is None else f"**missed** by {mana - IDLE_RSS_TARGET_MB:.1f} MB"
        ratio_text = "—" if math.isnan(ratio) else f"{ratio:.2f}"
        lines.append(f"| idle RSS | after start | — | {' | '.join(cells)} | {ratio_text} | — | ≤ 50 MB | {over} |")
        results.append({"label": "idle RSS", "figures_mb": dict(idle_rss_mb), "met": met})
    for line, result in _scale_rows(scale):
        lines.append(line)
        results.append(result)
    return [*lines, ""], results


def _scale_rows(scale: Mapping[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """The scale scenario's checkable figures: errors, added TTFT p99, RSS after ÷ idle, CPU per relayed event.

    CPU per relayed event gets a row per manaproxy target: one process, and with `server.workers` (its
    supervisor and workers summed, shown in the manaproxy column).
    """
    if not scale or "targets" not in scale:
        return []
    waves = scale["targets"]
    name = f"scale ({scale['streams']:,} streams)"
    rows = []
    errors = {t: w["errors"] for t, w in waves.items()}
    cells = " | ".join(f"{errors[t]:,}" if t in errors else "—" for t in ("direct", "bare", "manaproxy"))
    met = errors.get("manaproxy") == 0
    rows.append(
        (
            f"| errors | {name} | {cells} | — | — | — | 0 | {'met' if met else '**missed**'} |",
            {"label": "scale errors", "figures": errors, "met": met},
        )
    )
    direct = waves.get("direct", {}).get("ttft_p99_ms", math.nan)
    added = {t: w["ttft_p99_ms"] - direct for t, w in waves.items() if t != "direct"}
    ratio = _ratio(added.get("manaproxy", math.nan), added.get("bare", math.nan))
    ttft_cells = [f"{direct:,.1f} ms", *(f"{added[t]:+,.1f} ms" if t in added else "—" for t in ("bare", "manaproxy"))]
    rows.append(
        (
            f"| added TTFT p99 | {name} | {' | '.join(ttft_cells)} | — | "
            f"{'—' if math.isnan(ratio) else f'{ratio:.2f}'} | — | (reported) | — |",
            {"label": "scale added TTFT p99", "figures_ms": added, "ratio": ratio},
        )
    )
    after = {t: w["rss_after_over_idle"] for t, w in waves.items() if "rss_after_over_idle" in w}
    if "manaproxy" in after:
        met = after["manaproxy"] <= RSS_AFTER_TARGET
        gap = after["manaproxy"] - RSS_AFTER_TARGET
        cells = " | ".join(f"{after[t]:.2f}" if t in after else "—" for t in ("bare", "manaproxy"))
        rows.append(
            (
                f"| RSS after ÷ idle | {name} | — | {cells} | — | — | — | ≤ {RSS_AFTER_TARGET:.2f} "
                f"| {'met' if met else f'**missed** by {gap:.2f}'} |",
                {"label": "scale RSS after / idle", "figures": after, "met": met},
            )
        )
    per_event = {t: w["proxy_us_per_event"] for t, w in waves.items() if "proxy_us_per_event" in w}
    bare = per_event.get("bare", math.nan)
    for target in sorted(t for t in per_event if t.startswith("manaproxy")):
        ratio = _ratio(per_event[target], bare)
        met = None if math.isnan(ratio) else ratio <= SCALE_CPU_PER_EVENT_TARGET
        label = "CPU per relayed event" + ("" if target == "manaproxy" else f" ({target})")
        rows.append(
            (
                f"| {label} | {name} | — | {_fmt(bare, 'µs', False)} | {_fmt(per_event[target], 'µs', False)} | — "
                f"| {'—' if math.isnan(ratio) else f'{ratio:.2f}'} | — | ≤ {SCALE_CPU_PER_EVENT_TARGET:.2f} "
                f"| {verdict(met, ratio, SCALE_CPU_PER_EVENT_TARGET, False)} |",
                {
                    "label": f"scale {label}",
                    "figures_us": {"bare": bare, target: per_event[target]},
                    "ratio": ratio,
                    "met": met,
                },
            )
        )
    return rows
