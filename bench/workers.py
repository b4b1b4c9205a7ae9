"""`make bench-workers` (`python bench/workers.py`): manaproxy with `server.workers: 1` against `auto`, and bare.

For each target (bare, manaproxy with 1 worker, manaproxy with `auto` workers) and each scenario (unstreamed
and streamed 50-token answers, 32 concurrent clients), a warm-up then a timed run of bench/loadgen.py; trials go
round-robin over scenarios and targets; figures are medians over trials. Nothing is pinned: the workers are
meant to take every core. So throughput here is bounded by what the load generator and the upstream leave the
proxy on this machine, and the figure that does not depend on it is CPU per request (and per relayed event):
the utime + stime of the proxy's whole process tree (supervisor and workers) from /proc over the timed run,
divided by what it served. The machine's other load during each run is reported beside it (`foreign_cores`).
Results: bench/results/workers-*.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procs import Service, children_cpu, free_port, machine_busy, save_results, unwind_on_signals
from targets import ROOT, Target, child_env, manaproxy_config, start_bare, start_upstream

LOADGEN = ROOT / "bench" / "loadgen.py"
TOKENS = 50
SCENARIOS = (("unstreamed", False), ("streamed", True))


def no_pin(argv: list[str]) -> list[str]:
    return argv


def start_manaproxy(ports: dict[int, int], workdir: Path, workers: str) -> Target:
    """manaproxy with `server.workers: workers`, logging at INFO (one line per request) as deployed."""
    name = f"manaproxy-w{workers}"
    config = workdir / f"{name}.yaml"
    config.write_text(manaproxy_config(ports) + f"server:\n  workers: {workers}\n")
    port = free_port()
    argv = [sys.executable, "-m", "manaproxy", "serve", "--config", str(config), "--host", "127.0.0.1"]
    env = child_env(workdir, {"LOG_LEVEL": "info"})
    service = Service(name, [*argv, "--port", str(port)], workdir / f"{name}.log", env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    service.wait_ready(f"{base}/health", timeout=30)
    time.sleep(1.0)  # `/health` answers once one worker listens: let the others come up
    urls = {t: f"{base}/v1/chat/completions" for t in ports}
    return Target(name, urls, {t: f"mana/bench-{t}" for t in ports}, service)


def drive(target: Target, stream: bool, seconds: float, concurrency: int) -> dict[str, Any]:
    argv = [sys.executable, str(LOADGEN), "--url", target.urls[TOKENS], "--model", target.models[TOKENS]]
    argv += ["--concurrency", str(concurrency), "--duration", f"{seconds:g}"]
    if stream:
        argv.append("--stream")
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def trial(target: Target, stream: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then one timed run with the CPU of the proxy's process tree and of the machine."""
    assert target.service is not None
    drive(target, stream, args.warmup, args.concurrency)
    cpu_before = target.service.cpu_seconds()
    busy_before, _ = machine_busy()
    children_before = children_cpu()
    wall = time.perf_counter()
    raw = drive(target, stream, args.duration, args.concurrency)
    wall = time.perf_counter() - wall
    proxy_cpu = target.service.cpu_seconds() - cpu_before
    client_cpu = children_cpu() - children_before
    busy, _ = machine_busy()
    ok = max(raw["ok"], 1)
    figures = {
        "rps": raw["rps"],
        "ok": raw["ok"],
        "errors": raw["errors"],
        "p50_ms": raw["total_p50_ms"],
        "events": raw["events"],
        "proxy_cores": proxy_cpu / wall,
        "proxy_us_per_req": 1e6 * proxy_cpu / ok,
        "client_cores": client_cpu / wall,
        # The machine's busy CPU over the run, in cores, and what of it was neither this proxy nor the client
        # (the upstream, other work on the machine).
        "machine_cores": (busy - busy_before) / wall,
        "other_cores": (busy - busy_before - proxy_cpu - client_cpu) / wall,
    }
    if stream and raw["events"]:
        figures["proxy_us_per_event"] = 1e6 * proxy_cpu / raw["events"]
    return figures


def median(trials: list[dict[str, Any]], key: str) -> float:
    values = [t[key] for t in trials if key in t]
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]) -> str:
    lines = [
        "| scenario | target | req/s | p50 ms | proxy cores | proxy µs/req | µs/event | ÷ bare µs/req | machine busy, cores |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, _ in SCENARIOS:
        bare = median(results[scenario]["bare"], "proxy_us_per_req")
        for name in names:
            runs = results[scenario][name]
            per_req = median(runs, "proxy_us_per_req")
            per_event = median(runs, "proxy_us_per_event")
            lines.append(
                f"| {scenario} | {name} | {median(runs, 'rps'):,.0f} | {median(runs, 'p50_ms'):.1f} |"
                f" {median(runs, 'proxy_cores'):.2f} | {per_req:,.0f} |"
                f" {'—' if per_event != per_event else f'{per_event:.1f}'} | {per_req / bare:.2f}× |"
                f" {median(runs, 'machine_cores'):.2f} |"
            )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed run (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each (1)")
    parser.add_argument("--trials", type=int, default=2, help="round-robin trials (2)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (32)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="manaproxy-bench-workers-"))
    services: list[Service] = []
    auto = len(os.sched_getaffinity(0))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {scenario: {} for scenario, _ in SCENARIOS}
    with unwind_on_signals():
        try:
            upstream, port = start_upstream(TOKENS, workdir, no_pin)
            services.append(upstream)
            ports = {TOKENS: port}
            targets = [start_bare(ports, workdir, no_pin)]
            targets += [start_manaproxy(ports, workdir, workers) for workers in ("1", "auto")]
            services += [t.service for t in targets if t.service is not None]
            print(
                f"{args.trials} × {len(SCENARIOS)} × {len(targets)} runs of {args.duration:g} s; auto = {auto} workers"
            )
            for number in range(args.trials):
                for scenario, stream in SCENARIOS:
                    for target in targets:
                        figures = trial(target, stream, args)
                        results[scenario].setdefault(target.name, []).append(figures)
                        print(
                            f"  trial {number + 1} {scenario:10} {target.name:16} {figures['rps']:7.0f}/s"
                            f" {figures['proxy_us_per_req']:6.0f} µs/req  machine {figures['machine_cores']:.2f} cores",
                            flush=True,
                        )
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: stopping the children", file=sys.stderr)
            return 130
        finally:
            for service in reversed(services):
                service.stop(grace=10.0)
            shutil.rmtree(workdir, ignore_errors=True)
    names = [t.name for t in targets]
    text = table(results, names)
    print()
    print(text)
    document = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cores": auto,
        "loadavg_at_end": os.getloadavg(),
        "settings": vars(args),
        "results": results,
        "table": text,
    }
    out = save_results("workers", document)
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
