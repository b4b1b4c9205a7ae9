"""The `scale` scenario: 10,000 concurrent slow streams through one proxy process (`bench/run.py --scenarios scale`).

A slow upstream (bench/upstream.py --protocol: a role event at once, then `chunks` events `interval` apart)
answers every stream. For each target in turn (direct, bare, manaproxy) bench/scale_client.py opens
`streams` streams over `ramp` seconds, one connection each, and reads them to the end; every target gets
the same count. Per target: errors, time to the first event (TTFT) and total time, the peak of streams open
at once, the proxy's CPU, and its resident memory (RSS) idle / peak / after, with its open files.

Open files bound the count: a proxied stream holds two sockets in the proxy (client and upstream), one
in the upstream and one in the load generator. The limit of every process is read up front; when the
requested count does not fit in one of them, the largest count that does (in hundreds, with headroom) is
run instead and the report says so. Nothing is raised behind anyone's back: what limits a process is
its own RLIMIT_NOFILE (manaproxy's soft limit, as it set it itself).

All proxies are started first and measured idle; the waves then run one after the other. A proxy is
stopped after its wave and its "after" reading, so each wave has the machine to itself. No TIME_WAIT is
left behind: the load generator closes with a reset and the upstream answers a proxy's FIN with one.
"""

from __future__ import annotations

import json
import math
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
    fd_limit,
    free_port,
    machine_busy,
    memory_kib,
    open_fds,
    tcp_ext_counters,
    time_wait_sockets,
)
from promhist import Histogram
from targets import OVERHEAD_METRIC, ROOT, Pin, Target, child_env, start_bare, start_manaproxy

HEADROOM_FDS = 100  # per process, beyond what it holds idle: log files, DNS, probes, the odd extra socket
SOON_AFTER_S = 5.0  # the first reading after a wave
CLIENT_OWN_FDS = 64  # what scale_client.py keeps for itself (it checks this too)


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    streams: int = 10_000
    chunks: int = 100
    interval_ms: float = 100.0
    ramp_s: float = 5.0
    settle_s: float = 65.0  # after the wave, before the "after" reading: past manaproxy's upstream keep-alive
    deadline_s: float = 0.0  # 0: ramp + 6 × the nominal stream time

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


def fitting_count(settings: ScaleSettings, limits: dict[str, tuple[int, int, int, int]]) -> tuple[int, str]:
    """The number of streams to run, and why when it is below the requested one.

    `limits` maps a process to (its soft and hard open-file limits, the files it holds idle, sockets per
    stream). The soft limit counts: raising it is the process's own business.
    """
    fits = {name: (soft - idle - HEADROOM_FDS) // per_stream for name, (soft, _, idle, per_stream) in limits.items()}
    short = sorted((name for name in fits if fits[name] < settings.streams), key=lambda name: fits[name])
    if not short:
        return settings.streams, ""
    count = max(100, fits[short[0]] // 100 * 100)
    missing = settings.streams - count
    reasons = []
    for name in short:
        soft, hard, idle, per_stream = limits[name]
        need = settings.streams * per_stream + idle + HEADROOM_FDS
        bound = "= its hard limit" if soft == hard else f"below its hard limit of {hard:,}, which it could raise to"
        reasons.append(
            f"{name} may hold {soft:,} open files (RLIMIT_NOFILE soft {bound}) and needs {need:,} "
            f"({per_stream} per stream, {idle} held idle, {HEADROOM_FDS} headroom)"
        )
    why = (
        f"target of {settings.streams:,} concurrent streams not met: ran {count:,} ({missing:,} fewer, "
        f"{100 * missing / settings.streams:.1f}%). " + "; ".join(reasons) + ". A hard limit can only be raised "
        "with CAP_SYS_RESOURCE, which this harness neither has nor asks for."
    )
    return count, why


class Sampler:
    """Samples a proxy's RSS and open files every `period` seconds on a thread while a wave runs."""

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
                self.peak_fds = max(self.peak_fds, open_fds(self.pid))
                self.peak_rss_kib = max(self.peak_rss_kib, memory_kib(self.pid)["VmRSS"])
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
    }
    tokens = settings.chunks
    try:
        upstream, port = start_slow_upstream(settings, workdir, pin_client)
        services.append(upstream)
        ports = {tokens: port}
        direct = Target("direct", {tokens: f"http://127.0.0.1:{port}/v1/chat/completions"}, {tokens: "fake-model"})
        proxies = [start_bare(ports, workdir, pin_proxy), start_manaproxy(ports, workdir, pin_proxy)]
        services += [p.service for p in proxies if p.service is not None]
        for target in [direct, *proxies]:
            check_stream(target, tokens)
        time.sleep(2.0)  # let start-up work (first probes, caches) finish before reading "idle"

        idle: dict[str, dict[str, int]] = {}
        for proxy in proxies:
            assert proxy.service is not None
            pid = proxy.service.pid
            soft, hard = fd_limit(pid)
            idle[proxy.name] = {"rss_kib": memory_kib(pid)["VmRSS"], "fds": open_fds(pid), "soft": soft, "hard": hard}
        client_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # scale_client.py raises its soft limit to it
        limits = {p: (v["soft"], v["hard"], v["fds"], 2) for p, v in idle.items()}
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
                target.service.stop()
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
    recorded_before = _overhead_count(target) if target.name == "manaproxy" else math.nan
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
        peak_kib = memory_kib(proxy.pid)["VmHWM"]
        figures.update(
            proxy_cpu_s=proxy_cpu,
            proxy_cores=proxy_cpu / wall,
            proxy_peak_cores=sampler.peak_cores,
            proxy_us_per_event=1e6 * proxy_cpu / figures["events"] if figures["events"] else math.nan,
            rss_idle_mb=idle["rss_kib"] / 1024,
            rss_peak_mb=max(peak_kib, sampler.peak_rss_kib) / 1024,
            fds_idle=idle["fds"],
            fds_peak=sampler.peak_fds,
        )
        # Two readings: soon after the wave, and once the proxy's pooled upstream connections have expired
        # (manaproxy keeps idle ones 60 s, aiohttp's default is 15 s).
        time.sleep(min(SOON_AFTER_S, settings.settle_s))
        figures.update(rss_soon_mb=memory_kib(proxy.pid)["VmRSS"] / 1024, fds_soon=open_fds(proxy.pid))
        time.sleep(max(0.0, settings.settle_s - SOON_AFTER_S))
        figures.update(rss_after_mb=memory_kib(proxy.pid)["VmRSS"] / 1024, fds_after=open_fds(proxy.pid))
        figures["rss_after_over_idle"] = figures["rss_after_mb"] / figures["rss_idle_mb"]
        if target.name == "manaproxy":
            figures["recorded_by_proxy"] = _overhead_count(target) - recorded_before
    figures["time_wait_added"] = time_wait_sockets(ports) - time_wait_before
    return figures
