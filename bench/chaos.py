"""`make chaos`: bounded load through a real manaproxy whose providers fail on purpose, and what came back.

`python bench/chaos.py [--requests 2000] [--concurrency 32] [--rate 40] [--seed 1] [--max-seconds 60]
[--stream-share 0.5] [--sighup-every S] [--keep-logs]` (docs/chaos.md has the long version):
- starts four fault-injecting upstreams (bench/upstream.py, one process each; `gamma` stops listening
  for 1 s every 5 s) and `python -m manaproxy serve` from this checkout with a generated config: short
  timeouts, a quick breaker, three aliases whose chains cross the upstreams;
- drives the requests through it (bench/chaos_load.py) and classifies every answer: complete (and of
  those, rescued by a later chain entry), visible mid-stream error, silent truncation, refused, proxy 500,
  transport error; cross-checks the counts against manaproxy's own /metrics;
- samples the proxy's RSS and open fds before, during (every 0.5 s), right after and 3 s after the load,
  and counts ERROR/Traceback lines in its log;
- prints a markdown report, saves bench/results/chaos-<time>.json, and exits 1 if any answer was a
  silent truncation or an HTTP 500 (2 if the harness itself failed).
Everything listens on 127.0.0.1; every child runs in its own process group and is stopped on exit,
Ctrl-C, SIGTERM or error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop
from chaos_load import (
    COMPLETE,
    PROXY_500,
    REFUSED,
    SILENT_TRUNCATION,
    TRANSPORT_ERROR,
    UNEXPECTED_STATUS,
    VISIBLE_ERROR,
    Outcome,
    plan,
    run_load,
)
from procs import Service, free_port, memory_kib, percentile, save_results, unwind_on_signals
from prometheus_client.parser import text_string_to_metric_families
from targets import ROOT, child_env

# Provider timeouts and breaker: short, so that faults cost little time and the breaker moves a lot.
TIMEOUTS = {"connect": 0.5, "first_byte": 0.5, "idle": 0.5, "total": 5}
HEALTH = {"failure_threshold": 2, "backoff_seconds": 2, "probe_interval_seconds": 1, "probe_timeout_seconds": 0.5}
HANG_SECONDS = TIMEOUTS["total"] + 1  # a hang or stall outlasts every timeout, unstreamed requests' included
CLIENT_TIMEOUT = 30.0  # longer than any chain walk can take (3 entries x `total`): past it, a request is stuck
IDLE_AFTER = 3.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    mix: str  # fault=weight,... (bench/upstream.py)
    role: str
    flap_every: float = 0.0
    flap_down: float = 1.0


UPSTREAMS = (
    Upstream(
        "alpha",
        "ok=57,slow=5,http_500=5,http_502=4,http_503=4,http_429=2,hang=3,reset=5,cut=6,stall=4,error_event=5",
        "flaky: ~40% of requests fail, every kind of fault",
    ),
    Upstream(
        "beta",
        "ok=77,slow=5,http_500=3,http_503=3,http_429=2,reset=3,cut=4,stall=1,error_event=2",
        "shaky: ~20% fail",
    ),
    Upstream("gamma", "ok=85,slow=5,http_502=3,cut=4,error_event=3", "down 1 s every 5 s; ~10% fail", 5.0, 1.0),
    Upstream("delta", "ok=88,slow=8,http_503=2,cut=2", "the steady last resort: ~4% fail"),
)
# name, chain, share of the requests. Each alias has its own model names, so every chain entry is a distinct
# target and the fallback metric's `from_model` tells which alias left its first entry.
ALIASES = (
    ("mana/chaos-a", ("alpha/a-model", "beta/a-model", "delta/a-model"), 0.45),
    ("mana/chaos-b", ("gamma/b-model", "alpha/b-model", "delta/b-model"), 0.35),
    ("mana/chaos-c", ("beta/c-model", "gamma/c-model"), 0.20),
)
FIRST_ENTRY = {name: chain[0] for name, chain, _ in ALIASES}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests to send (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="requests started per second at most (default 40; 0: unpaced)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the request plan and every fault draw")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="start no request after this many seconds of load (60)"
    )
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests (0.5)")
    parser.add_argument("--sighup-every", type=float, default=0.0, metavar="S", help="SIGHUP (reload) every S s")
    parser.add_argument("--keep-logs", action="store_true", help="keep the generated config and children's logs")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.rate < 0 or args.max_seconds <= 0:
        parser.error("--requests and --concurrency must be >= 1, --rate >= 0, --max-seconds > 0")
    if not 0 <= args.stream_share <= 1:
        parser.error("--stream-share must be in [0, 1]")
    return args


def manaproxy_config(ports: dict[str, int]) -> str:
    def flow(mapping: dict[str, float]) -> str:
        return "{" + ", ".join(f"{key}: {value:g}" for key, value in mapping.items()) + "}"

    lines = ["# generated by bench/chaos.py", "providers:"]
    for name, port in ports.items():
        lines += [f"  {name}:", f"    base_url: http://127.0.0.1:{port}/v1", f"    timeouts: {flow(TIMEOUTS)}"]
    lines.append("aliases:")
    for name, chain, share in ALIASES:
        lines += [f"  {name}:", f"    description: {share:.0%} of the chaos load", f"    chain: [{', '.join(chain)}]"]
    lines += [f"default: {ALIASES[0][0]}", f"health: {flow(HEALTH)}", "server: {shutdown_timeout_seconds: 2}"]
    return "\n".join(lines) + "\n"


# -- the proxy process, seen from /proc ----------------------------------------------------------------
def socket_inodes(pid: int) -> tuple[int, set[str]]:
    """(open fds, inodes of the sockets among them)."""
    fds = os.listdir(f"/proc/{pid}/fd")
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    return len(fds), inodes


TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def snapshot(pid: int, proxy_port: int, upstream_ports: set[int]) -> dict[str, int]:
    """RSS, fds and the proxy's TCP connections by peer and state, now."""
    fds, inodes = socket_inodes(pid)
    figures = {"rss_kib": memory_kib(pid)["VmRSS"], "fds": fds}
    connections: Counter[str] = Counter()
    listed = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] not in inodes:
                    continue
                listed += 1
                local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
                state = TCP_STATES.get(fields[3], fields[3])
                if remote in upstream_ports:
                    connections[f"upstream_{state}"] += 1
                elif local == proxy_port and state != "listen":
                    connections[f"client_{state}"] += 1
    with contextlib.suppress(OSError):
        unix = {line.split()[6] for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]}
        connections["unix_sockets"] = len(inodes & unix)
        listed += connections["unix_sockets"]
    # A TCP socket the kernel has already closed (reset, or both ends done) whose fd is still open is in no table.
    connections["socket_other"] = len(inodes) - listed
    figures.update(connections)
    return figures


async def sample_peak(pid: int, stop: asyncio.Event, peak: dict[str, int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak["rss_kib"] = max(peak.get("rss_kib", 0), memory_kib(pid)["VmRSS"])
            peak["fds"] = max(peak.get("fds", 0), len(os.listdir(f"/proc/{pid}/fd")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def send_sighups(pid: int, every: float, sent: list[float]) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(every)
        os.kill(pid, signal.SIGHUP)
        sent.append(round(time.monotonic() - started, 2))


# -- manaproxy's own account: /metrics ----------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before: Samples, after: Samples, name: str, **match: str | None) -> dict[tuple[tuple[str, str], ...], float]:
    """Per label set, the growth of `name` over the run, for label sets matching `match`."""
    grown = {}
    for (sample_name, labels), value in after.items():
        if sample_name != name:
            continue
        given = dict(labels)
        if all(given.get(key) == want for key, want in match.items()):
            grown[labels] = value - before.get((sample_name, labels), 0.0)
    return grown


def crosschecks(outcomes: list[Outcome], before: Samples, after: Samples) -> list[dict[str, Any]]:
    """Client-side counts against manaproxy's own metrics: each line is (what, client, metrics, equal?)."""

    def total(grown: dict[Any, float]) -> int:
        return round(sum(grown.values()))

    left_first = sum(
        total(delta(before, after, "mana_llm_fallback_total", from_model=first)) for first in FIRST_ENTRY.values()
    )
    ran_out = total(delta(before, after, "mana_llm_fallback_total", to_model=""))
    moved = sum(1 for o in outcomes if o.status == 200 and o.resolved != FIRST_ENTRY[o.alias])
    # A chain that ran out answers 503, or, when the one entry tried answered it, that entry's own status.
    exhausted = sum(1 for o in outcomes if o.ran_out)
    mid_stream = sum(
        total(delta(before, after, "mana_llm_stream_outcomes_total", outcome=word))
        for word in ("upstream_error", "idle_timeout")
    )
    statuses_metric: Counter[str] = Counter()
    for labels, grown in delta(before, after, "mana_llm_requests_total", method="POST").items():
        if round(grown):
            statuses_metric[dict(labels)["status"]] += round(grown)
    statuses_client = Counter(str(o.status) for o in outcomes if o.status is not None)
    checks = [
        (
            "left the first chain entry (200 from a later entry + the chain ran out) vs fallback_total from it",
            moved + exhausted,
            left_first,
        ),
        ('the chain ran out (X-Mana-LLM-Attempts on an error) vs fallback_total{to_model=""}', exhausted, ran_out),
        (
            "visible mid-stream errors vs stream_outcomes_total{upstream_error,idle_timeout}",
            sum(1 for o in outcomes if o.category == VISIBLE_ERROR),
            mid_stream,
        ),
        ("statuses seen vs mana_llm_requests_total{method=POST}", dict(statuses_client), dict(statuses_metric)),
    ]
    return [
        {"what": what, "client": client, "metrics": metric, "equal": client == metric}
        for what, client, metric in checks
    ]


# -- the run ---------------------------------------------------------------------------------------------
class Chaos:
    """One chaos run: the children it started and what it measured."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.services: list[Service] = []
        self.upstream_ports: dict[str, int] = {}
        self.proxy: Service | None = None
        self.proxy_port = 0
        self.stop_seconds: float | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self) -> None:
        python = sys.executable
        for upstream in UPSTREAMS:
            port = free_port()
            argv = [python, str(ROOT / "bench" / "upstream.py"), "--name", upstream.name, "--port", str(port)]
            # Each upstream's draws are seeded by the seed and its name (bench/upstream.py).
            argv += ["--seed", str(self.args.seed), "--mix", upstream.mix, "--hang-seconds", f"{HANG_SECONDS:g}"]
            argv += ["--tokens", "4-16"]
            if upstream.flap_every:
                argv += ["--flap-every", f"{upstream.flap_every:g}", "--flap-down", f"{upstream.flap_down:g}"]
            service = Service(upstream.name, argv, self.workdir / f"{upstream.name}.log", child_env(self.workdir))
            self.services.append(service)
            self.upstream_ports[upstream.name] = port
        for service, port in zip(self.services, self.upstream_ports.values(), strict=True):
            service.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=20)
        config = self.workdir / "manaproxy.yaml"
        config.write_text(manaproxy_config(self.upstream_ports))
        self.proxy_port = free_port()
        argv = [python, "-m", "manaproxy", "serve", "--config", str(config), "--port", str(self.proxy_port)]
        # cwd = this checkout: `-m` puts it first on sys.path, so its manaproxy runs, not an installed one.
        env = child_env(self.workdir, {"LOG_LEVEL": "info"})
        self.proxy = Service("manaproxy", argv, self.workdir / "manaproxy.log", env, cwd=ROOT)
        self.services.append(self.proxy)
        self.proxy.wait_ready(f"{self.base}/health", timeout=30)

    def stop(self) -> None:
        """The proxy first (timed: its drain), then the upstreams."""
        if self.proxy is not None and self.proxy.running:
            started = time.monotonic()
            self.proxy.stop(grace=10)
            self.stop_seconds = time.monotonic() - started
        for service in reversed(self.services):
            service.stop()

    def upstream_stats(self) -> dict[str, Any]:
        stats = {}
        for name, port in self.upstream_ports.items():
            for _ in range(5):  # gamma may be down for a second
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as resp:
                        stats[name] = json.loads(resp.read())
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.5)
        return stats

    async def load(self) -> dict[str, Any]:
        """Drive the plan; sample the proxy meanwhile; return the raw measurements."""
        assert self.proxy is not None
        args = self.args
        pid, ports = self.proxy.pid, set(self.upstream_ports.values())
        requests = plan(args.requests, [(name, share) for name, _, share in ALIASES], args.stream_share, args.seed)
        metrics_before = scrape(self.base)
        before = snapshot(pid, self.proxy_port, ports)
        stop, peak = asyncio.Event(), dict(before)
        sampler = asyncio.create_task(sample_peak(pid, stop, peak))
        sighups: list[float] = []
        reloader = asyncio.create_task(send_sighups(pid, args.sighup_every, sighups)) if args.sighup_every else None
        try:
            outcomes, unsent, seconds = await run_load(
                f"{self.base}/v1/chat/completions",
                requests,
                concurrency=args.concurrency,
                rate=args.rate,
                max_seconds=args.max_seconds,
                client_timeout=CLIENT_TIMEOUT,
            )
        finally:
            if reloader is not None:
                reloader.cancel()
            stop.set()
            await sampler
        right_after = snapshot(pid, self.proxy_port, ports)
        await asyncio.sleep(IDLE_AFTER)
        after_idle = snapshot(pid, self.proxy_port, ports)
        metrics_after = scrape(self.base)
        return {
            "outcomes": outcomes,
            "unsent": unsent,
            "seconds": seconds,
            "sighups": sighups,
            "process": {"before": before, "peak": peak, "right_after": right_after, "after_idle": after_idle},
            "metrics_before": metrics_before,
            "metrics_after": metrics_after,
        }


def log_findings(path: Path) -> dict[str, Any]:
    """ERROR, CRITICAL and Traceback lines of the proxy's log (the first few kept), and warnings counted."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    bad = [line for line in lines if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
    return {
        "lines": len(lines),
        "error_lines": sum(1 for line in bad if not line.startswith("Traceback")),
        "tracebacks": sum(1 for line in lines if "Traceback" in line),
        "warnings": sum(1 for line in lines if " WARNING " in line),
        "first_errors": bad[:10],
    }


def git_commit() -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--", "manaproxy") else "")


# -- the report -----------------------------------------------------------------------------------------
def tally(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Rows of the outcome table, each split into streamed / unstreamed / total."""
    rows: dict[str, dict[str, int]] = {}

    def count(row: str, outcome: Outcome) -> None:
        cell = rows.setdefault(row, {"streamed": 0, "unstreamed": 0, "total": 0})
        cell["streamed" if outcome.stream else "unstreamed"] += 1
        cell["total"] += 1

    for outcome in outcomes:
        count("requests", outcome)
        if outcome.category == REFUSED:
            count(f"refused HTTP {outcome.status}", outcome)
        else:
            count(outcome.category, outcome)
        if outcome.category == COMPLETE and outcome.resolved != FIRST_ENTRY[outcome.alias]:
            count("rescued", outcome)
        if outcome.status is not None and outcome.status >= 400 and not outcome.openai_shaped:
            count("error not OpenAI-shaped", outcome)
        if outcome.category == REFUSED and outcome.retry_after is None:
            count("refused without Retry-After", outcome)
        if outcome.model_mismatch:
            count("model not rewritten", outcome)
    return rows


ROWS_BEFORE_REFUSED = (
    ("requests", "requests answered or failed"),
    (COMPLETE, "complete"),
    ("rescued", "… of which rescued by a later chain entry"),
    (VISIBLE_ERROR, "visible mid-stream error (error event, no [DONE])"),
    (SILENT_TRUNCATION, "**silent truncation** (must be 0)"),
)
ROWS_AFTER_REFUSED = (
    ("refused without Retry-After", "… refusals without `Retry-After`"),
    (PROXY_500, "**proxy HTTP 500** (must be 0)"),
    (TRANSPORT_ERROR, "transport error (client ↔ manaproxy)"),
    (UNEXPECTED_STATUS, "unexpected status (not 200, < 400)"),
    ("error not OpenAI-shaped", "error (status ≥ 400) whose body is not OpenAI-shaped"),
    ("model not rewritten", "200 answer whose `model` ≠ X-Mana-LLM-Resolved"),
)


def render(args: argparse.Namespace, commit: str, run: dict[str, Any], extra: dict[str, Any]) -> str:
    outcomes: list[Outcome] = run["outcomes"]
    rows = tally(outcomes)
    zero = {"streamed": 0, "unstreamed": 0, "total": 0}
    refused = sorted(row for row in rows if row.startswith("refused HTTP"))
    order = [*ROWS_BEFORE_REFUSED, *((row, row) for row in refused), *ROWS_AFTER_REFUSED]
    out = [
        f"## manaproxy under chaos ({commit}, seed {args.seed})",
        "",
        f"{len(outcomes)} requests ({run['unsent']} not sent) in {run['seconds']:.1f} s at concurrency "
        f"{args.concurrency}"
        + (f", at most {args.rate:g}/s" if args.rate else ", unpaced")
        + f", {args.stream_share:.0%} streamed"
        + (f"; SIGHUP every {args.sighup_every:g} s ({len(run['sighups'])} sent)" if args.sighup_every else "")
        + ".",
        "",
        "| outcome | streamed | unstreamed | total |",
        "|---|---:|---:|---:|",
    ]
    for key, label in order:
        cell = rows.get(key, zero)
        out.append(f"| {label} | {cell['streamed']} | {cell['unstreamed']} | {cell['total']} |")
    complete = [o.seconds for o in outcomes if o.category == COMPLETE]
    slowest = {
        kind: max((o.seconds for o in outcomes if o.stream == (kind == "streamed")), default=0.0)
        for kind in ("streamed", "unstreamed")
    }
    out += [
        "",
        f"Seconds per request: complete p50 {percentile(complete, 50):.3f}, p99 {percentile(complete, 99):.3f}; "
        f"slowest streamed {slowest['streamed']:.2f}, unstreamed {slowest['unstreamed']:.2f} "
        f"(past {CLIENT_TIMEOUT:g} a request counts as stuck: a transport error).",
        "",
        "| proxy process | before | peak | right after | after 3 s idle |",
        "|---|---:|---:|---:|---:|",
    ]
    process = run["process"]
    phases = ("before", "peak", "right_after", "after_idle")
    out.append("| RSS (MiB) | " + " | ".join(f"{process[p].get('rss_kib', 0) / 1024:.1f}" for p in phases) + " |")
    out.append("| open fds | " + " | ".join(str(process[p].get("fds", 0)) for p in phases) + " |")
    for key in sorted(
        {k for p in ("before", "right_after", "after_idle") for k in process[p] if "_" in k} - {"rss_kib"}
    ):
        cells = " | ".join("–" if p == "peak" else str(process[p].get(key, 0)) for p in phases)
        label = {"socket_other": "other sockets (e.g. closed TCP, fd open)", "unix_sockets": "unix sockets"}.get(
            key, "TCP " + key
        )
        out.append(f"| {label.replace('_', ' ')} | {cells} |")
    logs = extra["log"]
    out += [
        "",
        f"Proxy log: {logs['lines']} lines, {logs['error_lines']} ERROR, {logs['tracebacks']} Traceback, "
        f"{logs['warnings']} WARNING. Stopping it (SIGTERM → exit) took "
        + (f"{extra['stop_seconds']:.2f} s." if extra.get("stop_seconds") is not None else "(not measured)."),
    ]
    if args.sighup_every:
        reloads = extra["reloads"]
        out.append(f"Reloads counted by manaproxy: {reloads}.")
    reasons = ", ".join(f"{reason} {count}" for reason, count in extra["fallback_reasons"].items() if count)
    out += ["", f"Chain entries skipped or failed, by reason (`mana_llm_fallback_total`): {reasons or 'none'}."]
    out += ["", "Cross-checks against manaproxy's /metrics:", ""]
    for check in extra["crosschecks"]:
        mark = "ok" if check["equal"] else "MISMATCH"
        out.append(f"- {mark}: {check['what']}: client {check['client']}, metrics {check['metrics']}")
    out += ["", "Faults injected (upstream: fault × count):", ""]
    roles = {upstream.name: upstream.role for upstream in UPSTREAMS}
    for name, stats in extra["upstreams"].items():
        injected = ", ".join(f"{fault} {count}" for fault, count in sorted(stats["injected"].items()))
        flaps = (
            f"; stopped {stats['flaps']}× ({stats['dropped_connections']} connections reset)" if stats["flaps"] else ""
        )
        out.append(f"- {name} ({roles[name]}): {injected}{flaps}")
    return "\n".join(out)


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="manaproxy-chaos-"))
    chaos = Chaos(args, workdir)
    commit = git_commit()
    status: int | None = None
    with unwind_on_signals():
        try:
            chaos.start()
            print(f"chaos: {args.requests} requests, concurrency {args.concurrency}, seed {args.seed} ...", flush=True)
            run = uvloop.run(chaos.load())
            upstreams = chaos.upstream_stats()
        except (RuntimeError, OSError) as exc:
            print(f"chaos failed: {exc}", file=sys.stderr)
            status = 2
        except KeyboardInterrupt:
            print("interrupted: stopping the children", file=sys.stderr)
            status = 130
        finally:
            chaos.stop()
    if status is not None:
        finish(workdir, keep=args.keep_logs or status == 2)
        return status
    status, problems = report(args, commit, chaos, run, upstreams)
    finish(workdir, keep=args.keep_logs or problems)
    return status


def report(
    args: argparse.Namespace, commit: str, chaos: Chaos, run: dict[str, Any], upstreams: dict[str, Any]
) -> tuple[int, bool]:
    """Print the report and save it; (exit status, whether anything deserves a look at the logs)."""
    outcomes: list[Outcome] = run["outcomes"]
    before, after = run["metrics_before"], run["metrics_after"]
    reloads = delta(before, after, "mana_llm_config_reloads_total")
    reasons: Counter[str] = Counter()
    for labels, grown in delta(before, after, "mana_llm_fallback_total").items():
        reasons[dict(labels)["reason"]] += round(grown)
    extra: dict[str, Any] = {
        "log": log_findings(chaos.workdir / "manaproxy.log"),
        "stop_seconds": chaos.stop_seconds,
        "crosschecks": crosschecks(outcomes, before, after),
        "upstreams": upstreams,
        "reloads": {dict(labels)["result"]: round(grown) for labels, grown in reloads.items()},
        "fallback_reasons": dict(reasons.most_common()),
    }
    print()
    print(render(args, commit, run, extra))
    bad = [o for o in outcomes if o.category in (SILENT_TRUNCATION, PROXY_500)]
    for outcome in bad:
        print(f"!!! {outcome.category.upper()}: {asdict(outcome)}", file=sys.stderr)
    config = chaos.workdir / "manaproxy.yaml"
    document = {
        "commit": commit,
        "args": vars(args),
        "config": config.read_text() if config.exists() else "",
        "upstreams_configured": {u.name: asdict(u) for u in UPSTREAMS},
        "seconds": run["seconds"],
        "unsent": run["unsent"],
        "sighups_at": run["sighups"],
        "table": tally(outcomes),
        "by_alias": {name: dict(Counter(o.category for o in outcomes if o.alias == name)) for name, _, _ in ALIASES},
        "process": run["process"],
        **extra,
        "not_complete": [asdict(o) for o in outcomes if o.category != COMPLETE or o.model_mismatch][:500],
    }
    out = save_results("chaos", document)
    print(f"\nsaved {out.relative_to(ROOT)}")
    problems = bool(bad) or extra["log"]["tracebacks"] > 0 or extra["log"]["error_lines"] > 0
    problems = problems or not all(check["equal"] for check in extra["crosschecks"])
    if bad:
        print(f"!!! FAILED: {len(bad)} silent truncation(s) / proxy HTTP 500(s), listed above", file=sys.stderr)
        return 1, problems
    return 0, problems


def finish(workdir: Path, *, keep: bool) -> None:
    if keep:
        print(f"config and logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
