"""Closed-loop load generator for chat completions: C concurrent clients, one JSON line out.

`python bench/loadgen.py --url URL --model M [--stream] [--concurrency C] [--duration S] [--requests N]
[--samples]` Each client sends a request, reads the whole answer and sends the next, until `duration` seconds
have passed or `requests` requests have been sent, whichever comes first (requests under way are finished, so
a run is bounded by that + one answer). For every answer it keeps the time to the first body byte (TTFB), to
the first body byte of an event carrying `delta.content` (TTFT; the role event before it carries none), the
total time, who answered (`X-Mana-LLM-Resolved`) and the number of SSE `data:` events; it reports percentiles
and, with `--samples`, every answer's [ttft_ms, ttfb_ms, total_ms, resolved] in order of completion. An answer
counts as ok only with status 200, some content and, when streamed, a final `data: [DONE]`.
Runs on uvloop so the client spends as little CPU per request as it can (it shares the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp
import orjson
import uvloop
from procs import percentile

PROMPT = [{"role": "user", "content": "Say hello in fifty words."}]
_CONTENT = re.compile(rb'"content":\s*"[^"]')  # a non-empty content
PCTS = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class Sample:
    ttft: float  # seconds from sending the request to the first body byte of content
    ttfb: float  # seconds from sending the request to the first body byte
    total: float  # seconds from sending the request to the end of the answer
    resolved: str  # X-Mana-LLM-Resolved, "" without one
    events: int  # SSE data events received (0 for an unstreamed answer)
    reads: int  # body reads it took: fewer than events when the sender coalesces events into one write


@dataclass(slots=True)
class Tally:
    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # by kind: "HTTP 503", "TimeoutError" ...
    last_error: str = ""


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> Sample | str:
    """Send one request and read its answer; a Sample, or a short description of what went wrong."""
    started = perf_counter()
    first = token = None
    events = reads = 0
    carry = b""  # the end of the previous read: a `data:` or `"content":"` split across two reads counts once
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        async for chunk in resp.content.iter_any():
            now = perf_counter()
            if first is None:
                first = now
            reads += 1
            window = carry + chunk
            events += window.count(b"data:") - carry.count(b"data:")
            if token is None and _CONTENT.search(window):
                token = now
            carry = window[-32:]
        ended = perf_counter()
        resolved = resp.headers.get("X-Mana-LLM-Resolved", "")
        if resp.status != 200:
            return f"HTTP {resp.status}"
    if first is None or token is None:
        return "no content"
    if stream and not carry.rstrip().endswith(b"data: [DONE]"):
        return "stream ended without [DONE]"
    return Sample(token - started, first - started, ended - started, resolved, events, reads)


async def run(
    url: str, model: str, *, stream: bool, concurrency: int, duration: float, requests: float, timeout: float
) -> tuple[Tally, float]:
    """C clients in a closed loop until `duration` or `requests` is reached; the tally and the wall time."""
    body = orjson.dumps({"model": model, "messages": PROMPT, "stream": stream})
    tally = Tally()
    numbers = itertools.count()

    async def client(session: aiohttp.ClientSession, deadline: float) -> None:
        while perf_counter() < deadline and next(numbers) < requests:
            try:
                outcome = await one_request(session, url, body, stream)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            if isinstance(outcome, Sample):
                tally.samples.append(outcome)
            else:
                tally.errors[outcome.partition(":")[0]] += 1
                tally.last_error = outcome
                await asyncio.sleep(0.01)  # a failing target must not turn the client into a busy loop

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout, auto_decompress=False) as session:
        started = perf_counter()
        await asyncio.gather(*(client(session, started + duration) for _ in range(concurrency)))
        return tally, perf_counter() - started


def figures(tally: Tally, elapsed: float, samples: bool) -> dict[str, Any]:
    """The JSON line: counts, rates and percentiles (ms) of one run."""
    done = tally.samples
    events = sum(s.events for s in done)
    result: dict[str, Any] = {
        "requests": len(done) + sum(tally.errors.values()),
        "ok": len(done),
        "errors": sum(tally.errors.values()),
        "errors_by_kind": dict(tally.errors.most_common()),
        "last_error": tally.last_error,
        "elapsed_s": elapsed,
        "rps": len(done) / elapsed,
        "events": events,
        "events_per_s": events / elapsed,
        "events_per_answer": events / len(done) if done else math.nan,
        "reads_per_answer": sum(s.reads for s in done) / len(done) if done else math.nan,
    }
    for name in ("total", "ttfb", "ttft"):
        values = [getattr(s, name) * 1000 for s in done]
        result.update({f"{name}_p{p}_ms": percentile(values, p) for p in PCTS})
    if samples:
        result["samples"] = [[s.ttft * 1000, s.ttfb * 1000, s.total * 1000, s.resolved] for s in done]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="full URL of the chat completions endpoint")
    parser.add_argument("--model", required=True)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=math.inf, help="seconds (default: until --requests)")
    parser.add_argument("--requests", type=float, default=math.inf, help="requests to send (default: no limit)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request at most (60)")
    parser.add_argument("--samples", action="store_true", help="add every answer's timings to the JSON")
    args = parser.parse_args()
    if math.isinf(args.duration) and math.isinf(args.requests):
        parser.error("give --duration, --requests or both")
    tally, elapsed = uvloop.run(
        run(
            args.url,
            args.model,
            stream=args.stream,
            concurrency=args.concurrency,
            duration=args.duration,
            requests=args.requests,
            timeout=args.timeout,
        )
    )
    json.dump(figures(tally, elapsed, args.samples), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
