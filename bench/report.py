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
    """Markdown table of one scenario: one row per target, throughput and CPU also as ratios to `bare`."""
    direct, bare = by_target.get("direct"), by_target.get("bare")
    lines = [f"### {scenario.name}: {scenario.title}", ""]
    if scenario.stream:
        lines += [
            "| target | streams/s | chunks/s | × direct | × bare | TTFB p50 ms | TTFB p99 ms | total p50 ms | total p99 ms"
            " | TTFB added | proxy CPU/chunk | CPU × bare | proxy CPU/stream | upstream CPU/stream | proxy core |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| target | req/s | × direct | × bare | p50 ms | p90 ms | p99 ms | p50 added | p99 added"
            " | proxy CPU/req | CPU × bare | upstream CPU/req | proxy core |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    cpu_key = "proxy_us_per_event" if scenario.stream else "proxy_us_per_req"
    for name, stats in by_target.items():
        base = direct if name != "direct" else None
        floor = bare if name not in ("direct", "bare") else None
        rps = f"{_num(stats['rps'])} ±{stats['rps_spread_pct']:.0f}%"
        core = "—" if math.isnan(stats.get("proxy_core_pct", math.nan)) else f"{stats['proxy_core_pct']:.0f}%"
        throughput = [
            _ratio(stats["rps"], base["rps"] if base else None),
            _ratio(stats["rps"], floor["rps"] if floor else None),
        ]
        cpu = [_cpu(stats, cpu_key), _ratio(stats.get(cpu_key, math.nan), floor.get(cpu_key) if floor else None)]
        if scenario.stream:
            row = [
                name,
                rps,
                _num(stats["events_per_s"]),
                *throughput,
                _ms(stats["ttfb_p50_ms"]),
                _ms(stats["ttfb_p99_ms"]),
                _ms(stats["p50_ms"]),
                _ms(stats["p99_ms"]),
                _added(stats["ttfb_p50_ms"], base["ttfb_p50_ms"] if base else None),
                *cpu,
                _cpu(stats, "proxy_us_per_req"),
                _cpu(stats, "upstream_us_per_req"),
                core,
            ]
        else:
            row = [
                name,
                rps,
                *throughput,
                _ms(stats["p50_ms"]),
                _ms(stats["p90_ms"]),
                _ms(stats["p99_ms"]),
                _added(stats["p50_ms"], base["p50_ms"] if base else None),
                _added(stats["p99_ms"], base["p99_ms"] if base else None),
                *cpu,
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


def scale_lines(scale: Mapping[str, Any]) -> list[str]:
    """The `scale` scenario: one column per target, each manaproxy ÷ bare beside them.

    `manaproxy-w<auto|N>` is manaproxy with `server.workers`; its CPU, RSS and open files are summed over
    the supervisor and its workers.
    """
    settings = scale["settings"]
    waves = {name: dict(wave) for name, wave in scale["targets"].items()}  # a copy to add derived figures to
    lines = [
        f"### scale: {scale['streams']:,} concurrent streams through each proxy "
        f"({settings['chunks']} chunks {settings['interval_ms']:g} ms apart, opened over {settings['ramp_s']:g} s)",
        "",
    ]
    if scale.get("shortfall"):
        lines += [f"**{scale['shortfall']}**", ""]
    names = [n for n in ("direct", "bare", "manaproxy") if n in waves]
    names += sorted(n for n in waves if n.startswith("manaproxy-w"))
    manas = [n for n in names if n.startswith("manaproxy")]
    lines += [
        "| | " + " | ".join(names) + "".join(f" | {m} ÷ bare" for m in manas) + " |",
        "|---|" + "---:|" * (len(names) + len(manas)),
    ]

    def row(label: str, key: str, fmt: str, ratio: bool = True) -> None:
        values = {n: waves[n].get(key) for n in names}
        cells = [
            "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v) for v in values.values()
        ]
        bare = values.get("bare")
        quotients = []
        for name in manas:
            mana = values.get(name)
            quotient = "—"
            if ratio and isinstance(mana, int | float) and isinstance(bare, int | float) and bare > 0:
                quotient = _ratio(mana, bare)
            quotients.append(quotient)
        lines.append(f"| {label} | " + " | ".join(cells + quotients) + " |")

    direct_ttft = waves.get("direct", {}).get("ttft_p99_ms", math.nan)
    for name in names:
        wave = waves[name]
        if name != "direct":
            wave["ttft_p99_added_ms"] = wave["ttft_p99_ms"] - direct_ttft
        if "fds_idle" in wave:
            wave["streams_inside"] = (wave["fds_peak"] - wave["fds_idle"]) // 2
            wave["fds"] = " / ".join(f"{wave[k]:,}" for k in ("fds_idle", "fds_peak", "fds_soon", "fds_after"))
        tcp = wave.get("tcp", {})
        if tcp:
            wave["tcp_ListenOverflows"] = tcp["ListenOverflows"]
            wave["tcp_syncookies"] = f"{tcp['SyncookiesSent']:,} / {tcp['SyncookiesFailed']:,}"
    nominal_s = settings["nominal_stream_s"]
    nominal_rate = scale["streams"] * 1000 / settings["interval_ms"]
    row("streams ok", "ok", "{:,}", ratio=False)
    row("errors", "errors", "{:,}", ratio=False)
    row("peak streams open at once (load generator)", "peak_open", "{:,}", ratio=False)
    row("peak streams inside the proxy (≈ open files beyond idle ÷ 2)", "streams_inside", "{:,}", ratio=False)
    row("TTFT p50 ms", "ttft_p50_ms", "{:,.1f}")
    row("TTFT p99 ms", "ttft_p99_ms", "{:,.1f}")
    row("TTFT p99 added over direct", "ttft_p99_added_ms", "{:+,.1f} ms")
    row(f"stream time p50 s (nominal {nominal_s:g})", "total_p50_s", "{:.2f}")
    row(f"stream time p99 s (nominal {nominal_s:g})", "total_p99_s", "{:.2f}")
    row(f"events/s delivered (nominal {nominal_rate:,.0f} at full concurrency)", "events_per_s", "{:,.0f}")
    row("proxy CPU, cores (wave average)", "proxy_cores", "{:.2f}")
    row("proxy CPU, cores (busiest 0.5 s)", "proxy_peak_cores", "{:.2f}")
    row("proxy CPU per relayed event (CPU s ÷ events delivered)", "proxy_us_per_event", "{:,.1f} µs")
    row("machine busy, cores (wave average)", "busy_cores", "{:.2f}", ratio=False)
    row("proxy processes (summed below and in CPU)", "processes", "{:,}", ratio=False)
    row("proxy RSS idle MB", "rss_idle_mb", "{:.1f}")
    row("proxy RSS peak MB", "rss_peak_mb", "{:.1f}")
    if settings["settle_s"] > 5:
        row("proxy RSS after MB (+5 s)", "rss_soon_mb", "{:.1f}")
    row(f"proxy RSS after MB (+{settings['settle_s']:g} s)", "rss_after_mb", "{:.1f}")
    row("RSS after ÷ idle (goal ≤ 1.10)", "rss_after_over_idle", "{:.2f}", ratio=False)
    row(
        f"proxy open files idle / peak / after +{min(5, settings['settle_s']):g} s / +{settings['settle_s']:g} s",
        "fds",
        "{}",
        ratio=False,
    )
    row("requests recorded by manaproxy", "recorded_by_proxy", "{:,.0f}", ratio=False)
    row("TIME_WAIT sockets added", "time_wait_added", "{:,}", ratio=False)
    row("accept queue overflows (machine)", "tcp_ListenOverflows", "{:,}", ratio=False)
    row("SYN cookies sent / failed (machine)", "tcp_syncookies", "{}", ratio=False)
    lines.append("")
    for name in names:
        kinds = waves[name].get("errors_by_kind") or {}
        if kinds:
            lines += [f"{name} errors: " + "; ".join(f"{k}: {v:,}" for k, v in kinds.items()), ""]
    return lines
