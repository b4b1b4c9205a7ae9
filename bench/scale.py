"""The `scale` scenario: 10,000 concurrent slow streams through one proxy (`bench/run.py --scenarios scale`).

A slow upstream (bench/upstream.py --protocol: a role event at once, then `chunks` events `interval` apart)
answers every stream. For each target in turn (direct, bare, manaproxy, and manaproxy with `server.workers:
auto` or N, named `manaproxy-w<auto|N>`) bench/scale_client.py opens `streams` streams over `ramp` seconds,
one connection each, and reads them to the end; every target gets the same count. Per target: errors, time
to the first event (TTFT) and total time, the peak of streams open at once, the proxy's CPU and CPU per
relayed event, and its resident memory (RSS) idle / peak / after, with its open files. For the workers
target, CPU, RSS and open files are summed over its supervisor and every worker (the process tree, from
/proc); it is not pinned to a core: its workers are meant to take every core, the proxy's and the one the
load generator and the upstream are pinned to, so its CPU per event is the figure to compare, not its pace.

Open files bound the count: a proxied stream holds two sockets in the proxy (client and upstream), one
in the upstream and one in the load generator. The limit of every process is read up front; when the
requested count does not fit in one of them, the largest count that does (in hundreds, with headroom) is
run instead and the report says so. Nothing is raised behind anyone's back: what limits a process is
its own RLIMIT_NOFILE (manaproxy's soft limit, as it set it itself). Each worker has its own limit and
holds only the streams the kernel gave it (`SO_REUSEPORT` spreads connections by a hash of their
addresses): a worker of N is counted for 2 / N sockets per stream of the wave, with 10% for an uneven spread.

All proxies are started first and measured idle; the waves then run one after the other. A proxy is
stopped after its wave and its "after" reading, so each wave has the machine to itself. No TIME_WAIT is
left behind: the load generator closes with a reset and the upstream answers a proxy's FIN with one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from procs import (
    Service,
    cpu_seconds,
    descendants,
    fd_limit,
    free_port,
    machine_busy,
    open_fds,
    tcp_ext_counters,
    time_wait_sockets,
    tree_memory_kib,
    tree_open_fds,
)
from promhist import Histogram
from targets import OVERHEAD_METRIC, ROOT, Pin, Target, child_env, start_bare, start_manaproxy
from workers import start_manaproxy as start_manaproxy_workers

HEADROOM_FDS = 100  # per process, beyond what it holds idle: log files, DNS, probes, the odd extra socket
SOON_AFTER_S = 5.0  # the first reading after a wave
CLIENT_OWN_FDS = 64  # what scale_client.py keeps for itself (it checks this too)
UNEVEN_SPREAD = 1.1  # a worker of N may get this much more than 1 / N of the streams (SO_REUSEPORT hashes)
WORKERS_UP_S = 30.0  # how long the workers target may take until every worker runs


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    streams: int = 10_000
    chunks: int = 100
    interval_ms: float = 100.0
    ramp_s: float = 5.0
    settle_s: float = 65.0  # after the wave, before the "after" reading: past manaproxy's upstream keep-alive
    deadline_s: float = 0.0  # 0: ramp + 6 × the nominal stream time
    workers: str = "auto"  # `server.workers` of the extra manaproxy target: "auto" or N; "" runs none

    @property
    def nominal_stream_s(self) -> float:
        return self.chunks * self.interval_ms / 1000

    @property
    def deadline(self) -> float:
        return self.deadline_s or self.ramp_s + 6 * self.nominal_stream_s


def start_slow_upstream(settings: ScaleSettings, workdir: Path, pin: Pin) -> tuple[Service, int]:
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "upstream.py"), "--protocol", "--port", str(port)]
    argv += ["--tokens", str(settings.chunks), "--gap-ms", f"{settings.interval_ms:g}"]
    service = Service("slow-upstream", pin(argv), workdir / "slow-upstream.log", child_env(workdir), cwd=ROOT)
    service.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=20)
    return service, port


def check_stream(target: Target, tokens: int) -> None:
    """One streamed request before the wave: the target relays a whole slow stream (else stop here)."""
    body = json.dumps({"model": target.models[tokens], "messages": [], "stream": True}).encode()
    request = urllib.request.Request(target.urls[tokens], data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        answer = resp.read()
    if not answer.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"scale: {target.name} did not relay a whole stream: {answer[-200:]!r}")


def fitting_count(settings: ScaleSettings, limits: dict[str, tuple[int, int, int, float]]) -> tuple[int, str]:
    """The number of streams to run, and why when it is below the requested one.

    `limits` maps a process to (its soft and hard open-file limits, the files it holds idle, sockets per
    stream of the wave: fewer than one for a worker that gets a share of them). The soft limit counts:
    raising it is the process's own business.
    """
    fits = {
        name: int((soft - idle - HEADROOM_FDS) // per_stream) for name, (soft, _, idle, per_stream) in limits.items()
    }
    short = sorted((name for name in fits if fits[name] < settings.streams), key=lambda name: fits[name])
    if not short:
        return settings.streams, ""
    count = max(100, fits[short[0]] // 100 * 100)
    missing = settings.streams - count
    reasons = []
    for name in short:
        soft, hard, idle, per_stream = limits[name]
        need = math.ceil(settings.streams * per_stream) + idle + HEADROOM_FDS
        bound = "= its hard limit" if soft == hard else f"below its hard limit of {hard:,}, which it could raise to"
        reasons.append(
            f"{name} may hold {soft:,} open files (RLIMIT_NOFILE soft {bound}) and needs {need:,} "
            f"({per_stream:g} per stream, {idle} held idle, {HEADROOM_FDS} headroom)"
        )
    why = (
        f"target of {settings.streams:,} concurrent streams not met: ran {count:,} ({missing:,} fewer, "
        f"{100 * missing / settings.streams:.1f}%). " + "; ".join(reasons) + ". A hard limit can only be raised "
        "with CAP_SYS_RESOURCE, which this harness neither has nor asks for."
    )
    return count, why


def worker_pids(pid: int) -> list[int]:
    """The processes of a proxy that hold its streams: a supervisor's workers, else the proxy itself."""
    return descendants(pid)[1:] or [pid]


def wait_for_workers(service: Service, count: int) -> None:
    """Return once the supervisor `service` runs `count` worker processes.

    Its `/health` answered once one worker listened; the check stream and the 2 s before the idle readings
    give the others time to listen too (a worker's start-up takes well under a second).
    """
    deadline = time.monotonic() + WORKERS_UP_S
    pids: list[int] = []
    while time.monotonic() < deadline:
        pids = descendants(service.pid)[1:]
        if len(pids) >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"scale: {service.name} runs {len(pids)} of {count} workers after {WORKERS_UP_S:g} s")


def start_workers_target(ports: dict[int, int], workdir: Path, workers: str) -> Target:
    """manaproxy with `server.workers: workers`, unpinned (bench/workers.py starts it), every worker up."""
    target = start_manaproxy_workers(ports, workdir, workers)
    assert target.service is not None
    try:
        wait_for_workers(target.service, len(os.sched_getaffinity(0)) if workers == "auto" else int(workers))
    except RuntimeError:
        target.service.stop(grace=10.0)
        raise
    return target


def proxy_limits(name: str, pid: int) -> tuple[str, tuple[int, int, int, float]]:
    """The open-file limit that binds a proxy: its own, or that of its tightest worker, with its share."""
    pids = worker_pids(pid)
    soft, hard = min(fd_limit(each) for each in pids)
    idle = max(open_fds(each) for each in pids)
    if len(pids) == 1:
        return name, (soft, hard, idle, 2)
    share = f"each of {name}'s {len(pids)} workers (1/{len(pids)} of the streams, +{UNEVEN_SPREAD - 1:.0%})"
    return share, (soft, hard, idle, 2 / len(pids) * UNEVEN_SPREAD)


class Sampler:
    """Samples a proxy's RSS and open files every `period` seconds on a thread while a wave runs.

    Summed over the proxy's process tree: a supervisor and its workers (for one process, that process).
    """

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid = pid
        self.period = period
        self.peak_fds = 0
        self.peak_rss_kib = 0
        self.peak_cores = 0.0  # the proxy's busiest sampling period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        cpu, when = cpu_seconds(self.pid), time.perf_counter()
        while not self._stop.wait(self.period):
            try:
                self.peak_fds = max(self.peak_fds, tree_open_fds(self.pid))
                self.peak_rss_kib = max(self.peak_rss_kib, tree_memory_kib(self.pid)["VmRSS"])
                now_cpu, now = cpu_seconds(self.pid), time.perf_counter()
            except OSError:
                return
            self.peak_cores = max(self.peak_cores, (now_cpu - cpu) / (now - when))
            cpu, when = now_cpu, now


def _overhead_count(target: Target) -> float:
    with urllib.request.urlopen(f"{target.base}/metrics", timeout=10) as resp:
        return Histogram.parse(resp.read().decode(), OVERHEAD_METRIC).count


def run_scale(
    settings: ScaleSettings, workdir: Path, pin_client: Pin, pin_proxy: Pin, log: Any = print
) -> dict[str, Any]:
    """The whole scenario: start, measure idle, one wave per target, stop. Returns the figures."""
    services: list[Service] = []
    result: dict[str, Any] = {}
    result["settings"] = {
        "streams_requested": settings.streams,
        "chunks": settings.chunks,
        "interval_ms": settings.interval_ms,
        "ramp_s": settings.ramp_s,
        "settle_s": settings.settle_s,
        "deadline_s": settings.deadline,
        "nominal_stream_s": settings.nominal_stream_s,
        "workers": settings.workers or None,
    }
    tokens = settings.chunks
    try:
        upstream, port = start_slow_upstream(settings, workdir, pin_client)
        services.append(upstream)
        ports = {tokens: port}
        direct = Target("direct", {tokens: f"http://127.0.0.1:{port}/v1/chat/completions"}, {tokens: "fake-model"})
        proxies = [start_bare(ports, workdir, pin_proxy), start_manaproxy(ports, workdir, pin_proxy)]
        services += [p.service for p in proxies if p.service is not None]
        if settings.workers:
            workers = start_workers_target(ports, workdir, settings.workers)
            assert workers.service is not None
            proxies.append(workers)
            services.append(workers.service)
        for target in [direct, *proxies]:
            check_stream(target, tokens)
        time.sleep(2.0)  # let start-up work (first probes, caches) finish before reading "idle"

        idle: dict[str, dict[str, int]] = {}
        limits: dict[str, tuple[int, int, int, float]] = {}
        for proxy in proxies:
            assert proxy.service is not None
            pid = proxy.service.pid
            idle[proxy.name] = {
                "rss_kib": tree_memory_kib(pid)["VmRSS"],
                "fds": tree_open_fds(pid),
                "processes": len(descendants(pid)),
            }
            name, limit = proxy_limits(proxy.name, pid)
            limits[name] = limit
        client_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # scale_client.py raises its soft limit to it
        limits["the upstream"] = (*fd_limit(upstream.pid), open_fds(upstream.pid), 1)
        limits["the load generator"] = (client_limit, client_limit, CLIENT_OWN_FDS, 1)
        count, why = fitting_count(settings, limits)
        result.update(streams=count, shortfall=why, fd_limits={k: v[:2] for k, v in limits.items()})
        if why:
            log(f"scale: {why}")

        waves: dict[str, dict[str, Any]] = {}
        for target in [direct, *proxies]:
            log(f"scale: {count:,} streams through {target.name} ...")
            waves[target.name] = wave(
                target, tokens, count, settings, upstream, port, pin_client, idle.get(target.name)
            )
            figures = waves[target.name]
            log(
                f"  {target.name:9} ok {figures['ok']:,} errors {figures['errors']:,} "
                f"TTFT p99 {figures['ttft_p99_ms']:.0f} ms, total p50 {figures['total_p50_s']:.1f} s"
            )
            if target.service is not None:
                target.service.stop(grace=10.0)  # a supervisor drains its workers first
        result["targets"] = waves
    finally:
        for service in reversed(services):
            service.stop()
    return result


def wave(
    target: Target,
    tokens: int,
    count: int,
    settings: ScaleSettings,
    upstream: Service,
    upstream_port: int,
    pin_client: Pin,
    idle: dict[str, int] | None,
) -> dict[str, Any]:
    """One wave of `count` streams through `target`, with the proxy's CPU, memory and files around it."""
    proxy = target.service
    is_manaproxy = target.name.startswith("manaproxy")  # /metrics on a workers' port sums every worker
    recorded_before = _overhead_count(target) if is_manaproxy else math.nan
    cpu_before = {"upstream": upstream.cpu_seconds(), "proxy": proxy.cpu_seconds() if proxy else 0.0}
    busy_before, _ = machine_busy()
    counters_before = tcp_ext_counters()
    ports = {upstream_port, urlsplit(target.urls[tokens]).port or 80}
    time_wait_before = time_wait_sockets(ports)
    argv = [sys.executable, str(ROOT / "bench" / "scale_client.py"), "--url", target.urls[tokens]]
    argv += ["--model", target.models[tokens], "--streams", str(count), "--ramp", f"{settings.ramp_s:g}"]
    argv += ["--deadline", f"{settings.deadline:g}"]
    wall = time.perf_counter()
    if proxy is not None:
        with Sampler(proxy.pid) as sampler:
            done = subprocess.run(
                pin_client(argv), capture_output=True, text=True, timeout=settings.deadline + 60, check=False
            )
    else:
        sampler = None
        done = subprocess.run(
            pin_client(argv), capture_output=True, text=True, timeout=settings.deadline + 60, check=False
        )
    wall = time.perf_counter() - wall
    if done.returncode != 0:
        raise RuntimeError(f"scale_client failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    figures: dict[str, Any] = json.loads(done.stdout)
    busy, _ = machine_busy()
    upstream_cpu = upstream.cpu_seconds() - cpu_before["upstream"]
    counters = tcp_ext_counters()
    figures["tcp"] = {name: counters[name] - counters_before[name] for name in counters}
    figures.update(
        wall_s=wall,
        upstream_cpu_s=upstream_cpu,
        nominal_events_per_s=count * 1000 / settings.interval_ms,
        busy_cores=(busy - busy_before) / wall,
    )
    if proxy is not None and sampler is not None and idle is not None:
        proxy_cpu = proxy.cpu_seconds() - cpu_before["proxy"]
        peak_kib = tree_memory_kib(proxy.pid)["VmHWM"]
        figures.update(
            proxy_cpu_s=proxy_cpu,
            proxy_cores=proxy_cpu / wall,
            proxy_peak_cores=sampler.peak_cores,
            proxy_us_per_event=1e6 * proxy_cpu / figures["events"] if figures["events"] else math.nan,
            rss_idle_mb=idle["rss_kib"] / 1024,
            rss_peak_mb=max(peak_kib, sampler.peak_rss_kib) / 1024,
            fds_idle=idle["fds"],
            fds_peak=sampler.peak_fds,
            processes=idle["processes"],
        )
        # Two readings: soon after the wave, and once the proxy's pooled upstream connections have expired
        # (manaproxy keeps idle ones 60 s, aiohttp's default is 15 s).
        time.sleep(min(SOON_AFTER_S, settings.settle_s))
        figures.update(rss_soon_mb=tree_memory_kib(proxy.pid)["VmRSS"] / 1024, fds_soon=tree_open_fds(proxy.pid))
        time.sleep(max(0.0, settings.settle_s - SOON_AFTER_S))
        figures.update(rss_after_mb=tree_memory_kib(proxy.pid)["VmRSS"] / 1024, fds_after=tree_open_fds(proxy.pid))
        figures["rss_after_over_idle"] = figures["rss_after_mb"] / figures["rss_idle_mb"]
        if is_manaproxy:
            figures["recorded_by_proxy"] = _overhead_count(target) - recorded_before
    figures["time_wait_added"] = time_wait_sockets(ports) - time_wait_before
    return figures
