"""Bench scenario `gpu`: a busy local GPU first in a chain, a cloud second; no limit, a fixed `max_concurrent: K`
(the oracle, which knows K) and `max_concurrent: auto` (which does not), side by side.

`python bench/gpu.py [--seconds 25] [--warmup 10] [--loads 0.5,1,2,4] [--ks 1,4] [--converge 60] [--seed 1]
[--keep-logs]` (docs/bench.md has the table and how to read it):
- a fake "local GPU" (in this process) answers K streamed requests at once — `PREFILL` to the first event,
  then `TOKENS` events, K × `ANSWER_PER_PLACE` seconds in all — and queues the rest in arrival order, as Ollama does with
  `OLLAMA_NUM_PARALLEL=K`; a fake "cloud" answers anything at once, its first event after `CLOUD_FIRST`;
- for each K, three `python -m manaproxy serve` from this checkout (none, static K, auto), each with its own fake
  GPU and the shared cloud, take the same open-loop Poisson arrivals (one seed) at each load, a multiple of the
  GPU's capacity (4 requests/s for either K), after a warm-up at 1× that is not counted (what auto learns
  carries over from load to load, as in a running service);
- per mode and load: requests, errors, time to first byte p50/p99 at the client and the share the GPU
  answered; the targets (auto's p99 within 1.25× the oracle's, its GPU share within 10 points);
- `--converge S`: K = 4 at 2× its capacity for S seconds, the GPU losing half its places (K 4 → 2, another
  process took half of it) a third of the way in; auto's limit (from `/v1/health`) each second, and p99 by
  10-second bins, for the three modes.
Prints a markdown report and saves bench/results/gpu-<time>.json. Every process listens on 127.0.0.1 and is
stopped on exit, Ctrl-C or error. Not part of manaproxy: a bench tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from procs import Service, free_port, percentile, save_results, unwind_on_signals
from targets import ROOT, child_env

PREFILL = 0.03  # seconds from a place on the GPU to its first event
TOKENS = 10  # events of an answer after the first
# Seconds an answer holds its place, per place: K = 1 answers in 0.25 s, K = 4 in 1 s (its places are slower),
# so the GPU's capacity is 4 requests/s whatever K and every cell has the same number of requests.
ANSWER_PER_PLACE = 0.25
CLOUD_FIRST = 0.3  # seconds to the cloud's first event
CLOUD_GAP = 0.01
MODES = ("none", "static", "auto")
BODY = orjson.dumps({"model": "mana/chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "bench"}]}


def capacity(k: int) -> float:
    """Requests per second the fake GPU with `k` places answers at most."""
    return 1 / ANSWER_PER_PLACE


def gap(k: int) -> float:
    """Seconds between the events of an answer of the GPU with `k` places."""
    return (ANSWER_PER_PLACE * k - PREFILL) / TOKENS


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


FIRST = _event({"role": "assistant", "content": ""})
WORD = _event({"content": "w "})
LAST = _event({}, "stop") + b"data: [DONE]\n\n"


class Gpu:
    """A model server with `k` places: the rest wait in arrival order (`k` may change while it runs)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.gap = gap(k)  # fixed at start: a K that drops later leaves each place as fast as it was
        self.serving = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    async def _place(self) -> None:
        if self.serving < self.k and not self._queue:
            self.serving += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise

    def _release(self) -> None:
        while self._queue and self.serving <= self.k:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.serving -= 1

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        await self._place()
        try:
            return await _stream(request, PREFILL, self.gap)
        finally:
            self._release()


async def _stream(request: web.Request, first: float, gap: float) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await asyncio.sleep(first)
    await response.write(FIRST)
    for _ in range(TOKENS):
        await asyncio.sleep(gap)
        await response.write(WORD)
    await response.write(LAST)
    await response.write_eof()
    return response


async def _cloud(request: web.Request) -> web.StreamResponse:
    await request.read()
    return await _stream(request, CLOUD_FIRST, CLOUD_GAP)


async def _models(request: web.Request) -> web.Response:
    return web.json_response(MODELS)


async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    app.router.add_get("/v1/models", _models)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def config_text(mode: str, k: int, gpu_port: int, cloud_port: int) -> str:
    limit = {"none": "", "static": f"    max_concurrent: {k}\n", "auto": "    max_concurrent: auto\n"}[mode]
    return (
        "providers:\n"
        f"  gpu:\n    base_url: http://127.0.0.1:{gpu_port}/v1\n{limit}"
        f"  cloud:\n    base_url: http://127.0.0.1:{cloud_port}/v1\n"
        "aliases:\n  mana/chat:\n    chain: [gpu/m, cloud/m]\n"
    )


@dataclass
class Result:
    ttfb: float | None  # seconds to the first byte at the client; None: not answered 200
    target: str = ""


@dataclass
class Cell:
    mode: str
    k: int
    load: float
    rate: float
    requests: int = 0
    errors: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    gpu_share: float = math.nan
    limit_after: int | None = None


async def one(session: aiohttp.ClientSession, url: str, at: float) -> tuple[float, Result]:
    started = time.perf_counter()
    try:
        async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                return at, Result(None)
            await resp.content.readany()
            ttfb = time.perf_counter() - started
            target = resp.headers.get("X-Mana-LLM-Resolved", "")
            await resp.read()
            return at, Result(ttfb, target)
    except (aiohttp.ClientError, TimeoutError):
        return at, Result(None)


async def poisson(
    session: aiohttp.ClientSession, urls: list[str], rate: float, seconds: float, seed: int
) -> list[list[tuple[float, Result]]]:
    """The same arrivals (`rate` a second for `seconds`, from `seed`) sent to each of `urls`; per url, each
    request's arrival (seconds from the start) and result."""
    rng = random.Random(seed)
    start = time.perf_counter()
    at = 0.0
    tasks: list[list[asyncio.Task[tuple[float, Result]]]] = [[] for _ in urls]
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        for index, url in enumerate(urls):
            tasks[index].append(asyncio.create_task(one(session, url, at)))
    return [list(await asyncio.gather(*each)) for each in tasks]


def summarize(cell: Cell, results: list[tuple[float, Result]]) -> Cell:
    answered = [result for _, result in results if result.ttfb is not None]
    cell.requests = len(results)
    cell.errors = len(results) - len(answered)
    times = [result.ttfb for result in answered if result.ttfb is not None]
    if times:
        cell.p50_ms = round(percentile(times, 50) * 1000, 1)
        cell.p99_ms = round(percentile(times, 99) * 1000, 1)
        cell.gpu_share = round(sum(1 for result in answered if result.target == "gpu/m") / len(answered), 3)
    return cell


@dataclass
class Proxy:
    mode: str
    gpu: Gpu
    runner: web.AppRunner
    service: Service
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def limit(self, session: aiohttp.ClientSession) -> int | None:
        async with session.get(f"http://127.0.0.1:{self.port}/v1/health") as resp:
            view = await resp.json()
        model = view["providers"]["gpu"]["models"].get("m") or {}
        concurrency = model.get("concurrency")
        return None if concurrency is None else int(concurrency["limit"])


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    cloud_port: int = 0
    proxies: list[Proxy] = field(default_factory=list)

    async def start(self, k: int, tag: str) -> list[Proxy]:
        proxies = []
        for mode in MODES:
            gpu = Gpu(k)
            runner, gpu_port = await serve(gpu.chat)
            config = self.workdir / f"{tag}-{mode}.yaml"
            config.write_text(config_text(mode, k, gpu_port, self.cloud_port))
            port = free_port()
            argv = [sys.executable, "-m", "manaproxy", "serve", "--config", str(config), "--port", str(port)]
            env = child_env(self.workdir, {"LOG_LEVEL": "warning"})
            service = Service(f"manaproxy-{tag}-{mode}", argv, self.workdir / f"{tag}-{mode}.log", env, cwd=ROOT)
            proxies.append(Proxy(mode, gpu, runner, service, port))
        self.proxies += proxies
        for proxy in proxies:
            await asyncio.to_thread(proxy.service.wait_ready, f"http://127.0.0.1:{proxy.port}/health", 30)
        return proxies

    async def stop(self, proxies: list[Proxy]) -> None:
        for proxy in proxies:
            proxy.service.stop()
            await proxy.runner.cleanup()
            self.proxies.remove(proxy)

    async def table(self, session: aiohttp.ClientSession, k: int) -> list[Cell]:
        proxies = await self.start(k, f"k{k}")
        urls = [proxy.url for proxy in proxies]
        cells: list[Cell] = []
        try:
            if self.args.warmup:
                await poisson(session, urls, capacity(k), self.args.warmup, self.args.seed)
            for index, load in enumerate(self.args.loads):
                rate = load * capacity(k)
                runs = await poisson(session, urls, rate, self.args.seconds, self.args.seed + 1 + index)
                for proxy, results in zip(proxies, runs, strict=True):
                    cell = summarize(Cell(proxy.mode, k, load, round(rate, 2)), results)
                    cell.limit_after = await proxy.limit(session)
                    cells.append(cell)
                    print(f"  K={k} {load:g}x {proxy.mode:6} {_row(cell)}", file=sys.stderr, flush=True)
        finally:
            await self.stop(proxies)
        return cells

    async def converge(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """K = 4 at 2× its capacity; a third of the way in, K halves."""
        k, seconds = 4, self.args.converge
        change = seconds / 3
        proxies = await self.start(k, "converge")
        urls = [proxy.url for proxy in proxies]
        auto = next(proxy for proxy in proxies if proxy.mode == "auto")
        limits: list[tuple[float, int | None]] = []
        start = time.perf_counter()

        async def watch() -> None:
            changed = False
            while True:
                now = time.perf_counter() - start
                if not changed and now >= change:
                    for proxy in proxies:
                        proxy.gpu.k = k // 2
                    changed = True
                limits.append((round(now, 1), await auto.limit(session)))
                await asyncio.sleep(1.0)

        try:
            if self.args.warmup:
                await poisson(session, urls, capacity(k), self.args.warmup, self.args.seed)
            start = time.perf_counter()
            watcher = asyncio.create_task(watch())
            try:
                runs = await poisson(session, urls, 2 * capacity(k), seconds, self.args.seed + 100)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        finally:
            await self.stop(proxies)
        bins: dict[str, list[dict[str, Any]]] = {}
        for proxy, results in zip(proxies, runs, strict=True):
            rows = []
            for low in range(0, math.ceil(seconds), 10):
                inside = [(at, result) for at, result in results if low <= at < low + 10]
                cell = summarize(Cell(proxy.mode, k, 2.0, 0.0), inside)
                rows.append({"from_s": low, "p99_ms": cell.p99_ms, "gpu_share": cell.gpu_share})
            bins[proxy.mode] = rows
        limits = [(at, limit) for at, limit in limits if at <= seconds]  # not the stragglers' wait
        settled = next((at for at, limit in limits if at >= change and limit is not None and limit <= k // 2), None)
        return {
            "change_at_s": round(change, 1),
            "auto_limit": limits,
            "auto_at_new_k_after_s": None if settled is None else round(settled - change, 1),
            "bins": bins,
        }


def _row(cell: Cell) -> str:
    share = "-" if math.isnan(cell.gpu_share) else f"{cell.gpu_share * 100:.0f} %"
    return (
        f"{cell.requests:5d} {cell.errors:4d} {cell.p50_ms:8.0f} {cell.p99_ms:8.0f} {share:>6} "
        f"{'-' if cell.limit_after is None else cell.limit_after}"
    )


def verdicts(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per K and load: auto against the oracle (p99 within 1.25×, GPU share within 10 points)."""
    out = []
    by = {(cell.mode, cell.k, cell.load): cell for cell in cells}
    for cell in cells:
        if cell.mode != "auto":
            continue
        oracle = by[("static", cell.k, cell.load)]
        ratio = cell.p99_ms / oracle.p99_ms if oracle.p99_ms else math.nan
        points = (cell.gpu_share - oracle.gpu_share) * 100
        out.append(
            {
                "k": cell.k,
                "load": cell.load,
                "p99_ratio": round(ratio, 2),
                "share_points": round(points, 1),
                "met": ratio <= 1.25 and abs(points) <= 10 and cell.errors == 0,
            }
        )
    return out


def report(cells: list[Cell], checks: list[dict[str, Any]], converged: dict[str, Any] | None, load: str) -> str:
    lines = [
        f"GPU: K places, {PREFILL * 1000:.0f} ms to the first event, answers of {TOKENS} events in "
        f"K × {ANSWER_PER_PLACE * 1000:.0f} ms (capacity {capacity(1):g} requests/s); "
        f"cloud: first event at {CLOUD_FIRST * 1000:.0f} ms, no limit. Machine: {load}.",
        "",
        "| K | load | mode | requests | errors | TTFB p50 ms | TTFB p99 ms | GPU share | limit after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        share = "-" if math.isnan(cell.gpu_share) else f"{cell.gpu_share * 100:.0f} %"
        limit = "-" if cell.limit_after is None else str(cell.limit_after)
        lines.append(
            f"| {cell.k} | {cell.load:g}× ({cell.rate:g}/s) | {cell.mode} | {cell.requests} | {cell.errors} | "
            f"{cell.p50_ms:.0f} | {cell.p99_ms:.0f} | {share} | {limit} |"
        )
    lines += [
        "",
        "| K | load | auto p99 / oracle p99 | auto − oracle GPU share | target met |",
        "|---|---|---|---|---|",
    ]
    for check in checks:
        met = "yes" if check["met"] else "**no**"
        lines.append(
            f"| {check['k']} | {check['load']:g}× | {check['p99_ratio']:.2f} | {check['share_points']:+.1f} points "
            f"| {met} |"
        )
    if converged is not None:
        lines += [
            "",
            f"Convergence: K = 4 → 2 at {converged['change_at_s']} s; auto's limit reached the new K "
            f"{converged['auto_at_new_k_after_s']} s after the change.",
            "",
            "| from s | " + " | ".join(f"{mode} p99 ms / GPU share" for mode in MODES) + " |",
            "|---|" + "---|" * len(MODES),
        ]
        for index, row in enumerate(converged["bins"]["auto"]):
            parts = []
            for mode in MODES:
                item = converged["bins"][mode][index]
                share = "-" if math.isnan(item["gpu_share"]) else f"{item['gpu_share'] * 100:.0f} %"
                parts.append(f"{item['p99_ms']:.0f} / {share}")
            lines.append(f"| {row['from_s']} | " + " | ".join(parts) + " |")
        limits = ", ".join(f"{at:g}:{limit}" for at, limit in converged["auto_limit"])
        lines += ["", f"auto's limit by second: {limits}"]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bench = Bench(args, workdir)
    cloud, bench.cloud_port = await serve(_cloud)
    before = os.getloadavg()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            cells: list[Cell] = []
            for k in args.ks:
                cells += await bench.table(session, k)
            converged = await bench.converge(session) if args.converge else None
    finally:
        await bench.stop(list(bench.proxies))
        await cloud.cleanup()
    after = os.getloadavg()
    load = f"{os.cpu_count()} cores, load average {before[0]:.1f} before and {after[0]:.1f} after"
    checks = verdicts(cells)
    print(report(cells, checks, converged, load))
    return {"cells": [asdict(cell) for cell in cells], "checks": checks, "converge": converged, "machine": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=25.0, help="seconds of load per cell")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds at 1x before the cells (not counted)")
    parser.add_argument("--loads", default="0.5,1,2,4", help="multiples of the GPU's capacity")
    parser.add_argument("--ks", default="1,4", help="places of the fake GPU")
    parser.add_argument("--converge", type=float, default=60.0, help="seconds of the K 4 -> 2 run (0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args()
    args.loads = [float(item) for item in args.loads.split(",")]
    args.ks = [int(item) for item in args.ks.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="manaproxy-gpu-"))
    try:
        with unwind_on_signals():
            result = asyncio.run(main_async(args, workdir))
        out = save_results("gpu", result)
        print(f"\nsaved {out.relative_to(ROOT)}", file=sys.stderr)
    finally:
        if args.keep_logs:
            print(f"config and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
