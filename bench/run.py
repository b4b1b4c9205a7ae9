"""`make bench`: what manaproxy costs per request and per token, against talking to the upstream directly,
against the bare passthrough (bench/bare.py: the floor) and against LiteLLM's proxy when it is installed,
on one machine, in one run, against one fake upstream.

Method (docs/bench.md has the long version):
- every system runs as its own process: fake upstreams (bench/upstream.py), bare, manaproxy, LiteLLM;
- unstreamed scenarios are driven by wrk (bench/wrk_post.lua), streamed ones by bench/loadgen.py;
- each (scenario, target) gets a warm-up, then a timed run; trials go round-robin over scenarios and
  targets, so background load from other work on the machine falls on every target alike; figures
  are medians over trials;
- with two or more cores, processes are pinned (`taskset`): with concurrent clients the proxy under
  test has a core of its own and the load generator shares the other with the upstream; with one
  client (one request at a time) everything shares one core, since a hop between cores costs each
  request a cross-core wake-up that direct calls would not pay;
- CPU per request/token is the proxy's utime+stime over the timed run divided by what it served;
- manaproxy's own `mana_llm_proxy_overhead_seconds` histogram is scraped around each of its runs;
- the issue's targets are ratios manaproxy ÷ bare of the same run (bench/goals.py);
- `tail` and `pool` (bench/tail.py) then run on processes of their own: hedging a heavy-tailed first byte
  (plain chain, `hedge_after: 0.1`, `hedge_after: auto`) and a pool of a fast and a 3× slower upstream;
- `scale` (bench/scale.py) runs last, on its own processes: 10,000 slow streams at once per target, manaproxy
  with `server.workers: auto` among them.
Everything listens on 127.0.0.1 and is stopped on exit, Ctrl-C or error. Results: bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from goals import goals_table
from hotspots import parse_raw, start_recording, summarize
from procs import (
    Service,
    children_cpu,
    machine_busy,
    memory_kib,
    result_path,
    save_results,
    set_affinity,
    unwind_on_signals,
)
from promhist import Histogram
from report import (
    Scenario,
    Trial,
    added_latency_lines,
    aggregate,
    overhead_table,
    profile_lines,
    scale_lines,
    scenario_table,
)
from scale import ScaleSettings, run_scale
from tail import POOL, TAIL, TailSettings, routing_lines, run_routing, without_samples
from targets import (
    OVERHEAD_METRIC,
    ROOT,
    Pin,
    Target,
    direct_target,
    find_litellm,
    install_litellm,
    litellm_version,
    start_bare,
    start_litellm,
    start_manaproxy,
    start_upstream,
)

import manaproxy

BENCH = ROOT / "bench"
WRK_SCRIPT = BENCH / "wrk_post.lua"
LOADGEN = BENCH / "loadgen.py"

SCENARIOS = (
    Scenario("chat-c1", "unstreamed, 1 client, 50-token answers (added latency)", False, 50, 1),
    Scenario("chat-c32", "unstreamed, 32 concurrent clients, 50-token answers", False, 50, 32),
    Scenario("chat-c64", "unstreamed, 64 concurrent clients, 50-token answers", False, 50, 64),
    Scenario("stream50-c1", "streamed, 1 client, 50 tokens (added time to first byte)", True, 50, 1),
    Scenario("stream50-c32", "streamed, 32 concurrent clients, 50 tokens", True, 50, 32),
    Scenario("stream200-c32", "streamed, 32 concurrent clients, 200 tokens", True, 200, 32),
)
SCALE = "scale"  # its own processes and load generator: bench/scale.py
ROUTING = (TAIL, POOL)  # their own processes and load generator: bench/tail.py
PROFILE_SCENARIOS = ("stream50-c32", "chat-c32")


def _workers(value: str) -> str:
    """`--scale-workers`: "auto", a number of workers ≥ 1, or "none" (returned as "": no workers target)."""
    if value in ("auto", "none"):
        return "" if value == "none" else value
    if value.isdigit() and int(value) >= 1:
        return str(int(value))
    raise argparse.ArgumentTypeError(f"expected auto, none or a number ≥ 1, not {value!r}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="timed runs per scenario and target (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each run (default 1)")
    parser.add_argument(
        "--scenarios",
        default="",
        help="comma-separated subset of: " + ", ".join([*(s.name for s in SCENARIOS), *ROUTING, SCALE]),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 trial of 2 s; tail/pool: 300 requests; scale: 1,000 streams of 30 chunks, 5 s settle: to try "
        "the harness, not to quote",
    )
    routing = parser.add_argument_group("the tail and pool scenarios (bench/tail.py)")
    routing.add_argument("--no-tail", action="store_true", help="skip the tail (hedging) scenario (about 40 s)")
    routing.add_argument("--no-pool", action="store_true", help="skip the pool scenario (about 30 s)")
    routing.add_argument("--tail-requests", type=int, help="streamed requests per variant (default 2,000)")
    routing.add_argument("--tail-concurrency", type=int, default=16, help="concurrent clients (default 16)")
    routing.add_argument("--tail-seed", type=int, default=1, help="seeds the upstreams' fast/slow draws (default 1)")
    routing.add_argument("--tail-warmup", type=int, help="requests through mana/auto before its run (default 200)")
    scale = parser.add_argument_group("the scale scenario (bench/scale.py)")
    scale.add_argument("--no-scale", action="store_true", help="skip it (it takes about 2 minutes)")
    scale.add_argument("--scale-streams", type=int, help="concurrent streams (default 10,000; fewer if fds run out)")
    scale.add_argument("--scale-chunks", type=int, help="content events per stream (default 100)")
    scale.add_argument("--scale-interval-ms", type=float, default=100.0, help="between events (default 100)")
    scale.add_argument("--scale-ramp", type=float, help="seconds to open all streams (default 5)")
    scale.add_argument("--scale-settle", type=float, help="seconds after a wave to the 'after' reading (default 65)")
    scale.add_argument(
        "--scale-workers",
        type=_workers,
        default="auto",
        metavar="auto|N|none",
        help="also run manaproxy with server.workers: auto or N (default auto; none: only the single process)",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to cores")
    lite = parser.add_mutually_exclusive_group()
    lite.add_argument("--with-litellm", action="store_true", help="install LiteLLM into bench/.venv-litellm if needed")
    lite.add_argument("--no-litellm", action="store_true", help="skip LiteLLM even if it is installed")
    parser.add_argument("--litellm", metavar="PATH", help="use this `litellm` executable")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy profile")
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs of the children")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.duration, args.warmup = 1, 2.0, 0.5
    # streams, chunks, ramp, settle
    defaults = (1_000, 30, 2.0, 5.0) if args.quick else (10_000, 100, 5.0, 65.0)
    args.scale_streams = args.scale_streams or defaults[0]
    args.scale_chunks = args.scale_chunks or defaults[1]
    args.scale_ramp = args.scale_ramp if args.scale_ramp is not None else defaults[2]
    args.scale_settle = args.scale_settle if args.scale_settle is not None else defaults[3]
    args.tail_requests = args.tail_requests or (300 if args.quick else 2000)
    args.tail_warmup = args.tail_warmup if args.tail_warmup is not None else (100 if args.quick else 200)
    return args


class Bench:
    """One benchmark run: the children it started, the targets, and the trials measured so far."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.services: list[Service] = []
        self.upstreams: dict[int, Service] = {}
        self.targets: list[Target] = []
        self.notes: list[str] = []
        cores = sorted(os.sched_getaffinity(0))
        self.pinned = bool(args.pin and len(cores) >= 2 and shutil.which("taskset"))
        # Load generator + upstream share one core; the proxy under test has the other (see `place`).
        self.client_core: int | None = cores[0] if self.pinned else None
        self.proxy_core: int | None = cores[1] if self.pinned else None
        self.wrk = shutil.which("wrk")
        self.foreign: list[float] = []
        self.idle_rss_mb: dict[str, float] = {}

    def place(self, target: Target, scenario: Scenario) -> None:
        """Put the proxy of `target` on the cores `scenario` calls for (see the module docstring)."""
        if self.pinned and target.service is not None:
            core = self.client_core if scenario.concurrency == 1 else self.proxy_core
            assert core is not None
            set_affinity(target.service.pid, {core})

    def pin(self, core: int | None) -> Pin:
        def wrap(argv: list[str]) -> list[str]:
            return ["taskset", "-c", str(core), *argv] if core is not None else argv

        return wrap

    # -- set-up -----------------------------------------------------------------------------------
    def start(self, scenarios: list[Scenario]) -> None:
        ports: dict[int, int] = {}
        for tokens in sorted({s.tokens for s in scenarios}):
            service, ports[tokens] = start_upstream(tokens, self.workdir, self.pin(self.client_core))
            self.services.append(service)
            self.upstreams[tokens] = service
        self.targets.append(direct_target(ports))
        for start in (start_bare, start_manaproxy):
            proxy = start(ports, self.workdir, self.pin(self.proxy_core))
            assert proxy.service is not None
            self.services.append(proxy.service)
            self.targets.append(proxy)
        self._start_litellm(ports)
        for target in self.targets:
            for scenario in scenarios:
                check(target, scenario)
        time.sleep(1.0)  # start-up work (first probes) done: what the proxies hold idle
        for target in self.targets:
            if target.service is not None:
                self.idle_rss_mb[target.name] = memory_kib(target.service.pid)["VmRSS"] / 1024

    def _start_litellm(self, ports: dict[int, int]) -> None:
        args = self.args
        if args.no_litellm:
            self.notes.append("LiteLLM: skipped (--no-litellm).")
            return
        executable = find_litellm(args.litellm)
        if executable is None and args.with_litellm:
            try:
                executable = install_litellm()
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                self.notes.append(f"LiteLLM: could not be installed here ({exc}); not compared.")
                return
        if executable is None:
            self.notes.append("LiteLLM: not installed; `bench/run.py --with-litellm` installs it. Not compared.")
            return
        try:
            target = start_litellm(executable, ports, self.workdir, self.pin(self.proxy_core))
        except RuntimeError as exc:
            self.notes.append(f"LiteLLM: could not be run ({exc}); not compared.")
            return
        assert target.service is not None
        self.services.append(target.service)
        self.targets.append(target)
        self.notes.append(f"LiteLLM: {litellm_version(executable)} from {executable}, 1 worker.")

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    # -- measuring ----------------------------------------------------------------------------------
    def drive(self, target: Target, scenario: Scenario, seconds: float) -> Trial:
        """Load `target` with `scenario` for `seconds`; normalized figures from wrk or loadgen."""
        url, model = target.urls[scenario.tokens], target.models[scenario.tokens]
        pin = self.pin(self.client_core)
        if not scenario.stream and self.wrk:
            # wrk takes whole seconds only.
            argv = [self.wrk, "-t1", f"-c{scenario.concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
            argv += ["-s", str(WRK_SCRIPT), url]
            done = subprocess.run(
                pin(argv), capture_output=True, text=True, check=True, env={**os.environ, "BENCH_MODEL": model}
            )
            line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON "))
            raw = json.loads(line.removeprefix("BENCH_JSON "))
            errors = sum(raw["errors"].values())
            elapsed = raw["duration_us"] / 1e6
            ok = raw["requests"] - raw["errors"]["status"]
            lat = raw["latency_us"]
            return {
                "ok": ok,
                "errors": errors,
                "last_error": f"wrk errors {raw['errors']}" if errors else "",
                "elapsed_s": elapsed,
                "rps": ok / elapsed,
                **{f"p{p}_ms": lat[f"p{p}"] / 1000 for p in (50, 90, 99)},
            }
        argv = [sys.executable, str(LOADGEN), "--url", url, "--model", model]
        argv += ["--concurrency", str(scenario.concurrency), "--duration", f"{seconds:g}"]
        if scenario.stream:
            argv.append("--stream")
        done = subprocess.run(pin(argv), capture_output=True, text=True, check=True)
        raw = json.loads(done.stdout)
        keep = ("ok", "errors", "last_error", "elapsed_s", "rps", "events", "events_per_s", "reads_per_answer")
        figures = {k: raw[k] for k in keep}
        figures.update({f"p{p}_ms": raw[f"total_p{p}_ms"] for p in (50, 90, 99)})
        figures.update({f"ttfb_p{p}_ms": raw[f"ttfb_p{p}_ms"] for p in (50, 90, 99)})
        return figures

    def trial(self, target: Target, scenario: Scenario) -> Trial:
        """Warm-up, then one timed run with CPU accounting (and /metrics deltas for manaproxy)."""
        self.place(target, scenario)
        self.drive(target, scenario, self.args.warmup)
        before = scrape_overhead(target) if target.name == "manaproxy" else None
        cpu_before = {s.name: s.cpu_seconds() for s in self.services}
        busy_before, _ = machine_busy()
        children_before = children_cpu()
        wall = time.perf_counter()
        figures = self.drive(target, scenario, self.args.duration)
        wall = time.perf_counter() - wall
        children = children_cpu() - children_before
        busy, _ = machine_busy()
        cpu = {s.name: s.cpu_seconds() - cpu_before[s.name] for s in self.services}
        if before is not None:
            delta = scrape_overhead(target) - before
            previous = target.overhead.get(scenario.name)
            target.overhead[scenario.name] = delta if previous is None else previous + delta
        # CPU the machine spent on anything but this benchmark during the run, in cores.
        foreign = (busy - busy_before - sum(cpu.values()) - children) / wall
        self.foreign.append(foreign)
        ok = max(figures["ok"], 1)
        upstream_cpu = cpu[self.upstreams[scenario.tokens].name]
        figures.update(
            upstream_cpu_s=upstream_cpu,
            upstream_us_per_req=1e6 * upstream_cpu / ok,
            client_cpu_s=children,
            foreign_cores=foreign,
        )
        if target.service is not None:
            proxy_cpu = cpu[target.service.name]
            figures.update(
                proxy_cpu_s=proxy_cpu,
                proxy_us_per_req=1e6 * proxy_cpu / ok,
                proxy_core_pct=100 * proxy_cpu / figures["elapsed_s"],
            )
            if scenario.stream and figures.get("events"):
                figures["proxy_us_per_event"] = 1e6 * proxy_cpu / figures["events"]
        return figures

    def profile(self, scenario: Scenario, seconds: float) -> dict[str, Any] | None:
        """Sample manaproxy with py-spy while `scenario` runs; None when py-spy is not available."""
        pyspy = shutil.which("py-spy") or _venv_tool("py-spy")
        mana = next(t for t in self.targets if t.name == "manaproxy")
        if pyspy is None or mana.service is None:
            self.notes.append("Profile: py-spy not found (pip install py-spy); skipped.")
            return None
        self.place(mana, scenario)
        raw_path = result_path("profile", f"-{scenario.name}.txt")
        recorder = start_recording(pyspy, mana.service.pid, seconds, raw_path)
        time.sleep(0.5)
        try:
            self.drive(mana, scenario, seconds + 1)
            output, _ = recorder.communicate(timeout=30)
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.wait()
        if recorder.returncode != 0 or not raw_path.exists():
            self.notes.append(f"Profile: py-spy failed: {output.decode(errors='replace').strip()[-300:]}")
            return None
        summary = summarize(parse_raw(raw_path.read_text()))
        summary["raw"] = str(raw_path.relative_to(ROOT))
        return summary


def _venv_tool(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else None


def scrape_overhead(target: Target) -> Histogram:
    with urllib.request.urlopen(f"{target.base}/metrics", timeout=10) as resp:
        return Histogram.parse(resp.read().decode(), OVERHEAD_METRIC)


def check(target: Target, scenario: Scenario) -> None:
    """One request before measuring: the target answers this scenario correctly (else stop here)."""
    body = {
        "model": target.models[scenario.tokens],
        "messages": [{"role": "user", "content": "hi"}],
        "stream": scenario.stream,
    }
    request = urllib.request.Request(
        target.urls[scenario.tokens], data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = resp.read()
        resolved = resp.headers.get("X-Mana-LLM-Resolved")
    if scenario.stream and not answer.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"{target.name} {scenario.name}: stream did not end with [DONE]: {answer[-200:]!r}")
    if target.name == "manaproxy" and resolved != f"fake{scenario.tokens}/fake-model":
        raise RuntimeError(f"manaproxy {scenario.name}: resolved to {resolved!r}")


def source_state() -> str:
    """The commit the measured manaproxy code comes from, and whether manaproxy/ differs from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain", "manaproxy"], capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" + uncommitted changes in manaproxy/" if dirty.stdout.strip() else "")


def conditions(bench: Bench) -> dict[str, Any]:
    busy0, total0 = machine_busy()
    time.sleep(1.0)
    busy1, total1 = machine_busy()
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "manaproxy": f"{manaproxy.__version__} at {source_state()}",
        "pinned": bench.pinned,
        "client_core": bench.client_core,
        "proxy_core": bench.proxy_core,
        "unstreamed_driver": "wrk" if bench.wrk else "loadgen.py",
        "trials": bench.args.trials,
        "duration_s": bench.args.duration,
        "warmup_s": bench.args.warmup,
        "loadavg_before": os.getloadavg(),
        "busy_cores_before": round((busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1), 2),
    }


def main() -> int:
    args = parse_args()
    wanted = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = wanted - {s.name for s in SCENARIOS} - {SCALE, *ROUTING}
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    scenarios = [s for s in SCENARIOS if not wanted or s.name in wanted]
    with_scale = (not wanted and not args.no_scale) or SCALE in wanted
    skipped = {TAIL: args.no_tail, POOL: args.no_pool}
    with_routing = [name for name in ROUTING if (not wanted and not skipped[name]) or name in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="manaproxy-bench-"))
    bench = Bench(args, workdir)
    trials: dict[str, dict[str, list[Trial]]] = {s.name: {} for s in scenarios}
    profiles: dict[str, dict[str, Any]] = {}
    after_overhead: dict[str, Histogram] = {}
    scale: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    with unwind_on_signals():
        try:
            before = conditions(bench)
            if scenarios:
                bench.start(scenarios)
            runs = args.trials * len(scenarios) * len(bench.targets)
            print(f"{runs} timed runs of {args.duration:g} s (+{args.warmup:g} s warm-up each) ...", flush=True)
            for number in range(args.trials):
                for scenario in scenarios:
                    for target in bench.targets:
                        figures = bench.trial(target, scenario)
                        trials[scenario.name].setdefault(target.name, []).append(figures)
                        print(
                            f"  trial {number + 1} {scenario.name:14} {target.name:9} {figures['rps']:9.0f}/s"
                            f" p50 {figures['p50_ms']:7.2f} ms  errors {figures['errors']}",
                            flush=True,
                        )
            after_overhead = {t.name: scrape_overhead(t) for t in bench.targets if t.name == "manaproxy"}
            for scenario in scenarios if args.profile else []:
                if scenario.name in PROFILE_SCENARIOS:
                    print(f"profiling manaproxy under {scenario.name} ...", flush=True)
                    summary = bench.profile(scenario, args.profile_seconds)
                    if summary is None:
                        break
                    profiles[scenario.name] = summary
            bench.stop()  # tail, pool and scale run on processes of their own, with the machine to themselves
            if with_routing:
                tail_settings = TailSettings(
                    requests=args.tail_requests,
                    concurrency=args.tail_concurrency,
                    seed=args.tail_seed,
                    warmup=args.tail_warmup,
                )
                routing_dir = workdir / "routing"
                routing_dir.mkdir()
                routing = run_routing(
                    with_routing, tail_settings, routing_dir, bench.pin(bench.client_core), bench.pin(bench.proxy_core)
                )
            if with_scale:
                settings = ScaleSettings(
                    streams=args.scale_streams,
                    chunks=args.scale_chunks,
                    interval_ms=args.scale_interval_ms,
                    ramp_s=args.scale_ramp,
                    settle_s=args.scale_settle,
                    workers=args.scale_workers,
                )
                print(f"scale: {settings.streams:,} streams × {settings.chunks} chunks per target ...", flush=True)
                scale_dir = workdir / "scale"
                scale_dir.mkdir()
                scale = run_scale(settings, scale_dir, bench.pin(bench.client_core), bench.pin(bench.proxy_core))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            if isinstance(exc, subprocess.CalledProcessError):
                print(exc.stderr or exc.stdout, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: stopping the children", file=sys.stderr)
            return 130
        finally:
            bench.stop()
            if args.keep_workdir:
                print(f"children's configs and logs: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    text, document = render(bench, scenarios, trials, profiles, before, after_overhead.get("manaproxy"), scale, routing)
    print()
    print(text)
    out = save_results("bench", _finite(document))
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


def render(
    bench: Bench,
    scenarios: list[Scenario],
    trials: dict[str, dict[str, list[Trial]]],
    profiles: dict[str, dict[str, Any]],
    before: dict[str, Any],
    total: Histogram | None,
    scale: dict[str, Any] | None,
    routing: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The markdown report and the JSON document of a finished run."""
    args = bench.args
    medians = {name: {t: aggregate(ts) for t, ts in by_target.items()} for name, by_target in trials.items()}
    mana = next((t for t in bench.targets if t.name == "manaproxy"), None)
    overhead = {name: h.summary() for name, h in mana.overhead.items()} if mana else {}
    if total is not None:
        overhead["all requests since start"] = total.summary()
    # Clamped at 0: a small negative is the slop of tick-based accounting, not negative load.
    foreign = sorted(bench.foreign) or [math.nan]
    before["foreign_cores_during_runs"] = {
        "median": max(0.0, round(foreign[len(foreign) // 2], 2)),
        "max": max(0.0, round(foreign[-1], 2)),
    }
    before["loadavg_after"] = os.getloadavg()

    lines = [f"## manaproxy bench, {before['date']}", ""]
    lines += [f"- {note}" for note in bench.notes]
    pinning = (
        f"1 client: all on core {bench.client_core}; concurrent clients: load generator + upstream on core "
        f"{bench.client_core}, proxy on core {bench.proxy_core}"
        if bench.pinned
        else "none"
    )
    foreign = before["foreign_cores_during_runs"]
    lines += [
        f"- manaproxy {before['manaproxy']}",
        f"- {before['cpu']}, {before['cores']} cores; Python {before['python']}, aiohttp {before['aiohttp']}; "
        f"pinning: {pinning}",
        f"- {args.trials} trials × {args.duration:g} s per scenario and target (+{args.warmup:g} s warm-up), "
        f"medians; unstreamed driven by {before['unstreamed_driver']}, streamed by loadgen.py",
        f"- other load on the machine: {before['busy_cores_before']} cores busy before start; "
        f"during the timed runs median {foreign['median']}, max {foreign['max']} cores",
        "",
    ]
    goal_lines, goals = goals_table(medians, trials, bench.idle_rss_mb, scale)
    lines += goal_lines
    if bench.idle_rss_mb:
        lines += [
            "Idle RSS (resident memory after start-up and one request per scenario): "
            + ", ".join(f"{name} {mb:.1f} MB" for name, mb in bench.idle_rss_mb.items()),
            "",
        ]
    lines += added_latency_lines(medians)
    for scenario in scenarios:
        lines += scenario_table(scenario, medians[scenario.name])
    if routing is not None:
        lines += routing_lines(routing)
    if scale is not None:
        lines += scale_lines(scale)
    if overhead:
        lines += overhead_table(overhead)
    for name, summary in profiles.items():
        lines += profile_lines(summary, name)
    text = "\n".join(lines)
    document = {
        "conditions": before,
        "notes": bench.notes,
        "scenarios": [dataclasses.asdict(sc) for sc in scenarios],
        "medians": medians,
        "trials": trials,
        "idle_rss_mb": bench.idle_rss_mb,
        "goals": goals,
        "scale": scale,
        "routing": without_samples(routing) if routing is not None else None,
        "overhead_histogram": overhead,
        "profiles": profiles,
        "report": text,
    }
    return text, document


def _finite(value: Any) -> Any:
    """NaN (a figure that does not apply) as JSON null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
