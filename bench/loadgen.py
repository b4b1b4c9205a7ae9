"""Closed-loop load generator for chat completions: N concurrent clients for a fixed time, one JSON line out.

`python bench/loadgen.py --url URL --model M [--stream] --concurrency C --duration S`
Each client sends a request, reads the whole answer, and sends the next, until the time is up (requests
under way then are finished, so the run is bounded by duration + one answer). For every answer it keeps
the time to the first body byte, the total time and the number of SSE `data:` events; an answer counts
as ok only with status 200 and, when streamed, a final `data: [DONE]`.
Runs on uvloop so the client spends as little CPU per request as it can (it shares the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import dataclass
from time import perf_counter

import aiohttp
import orjson
import uvloop
from procs import percentile

PROMPT = [{"role": "user", "content": "Say hello in fifty words."}]


@dataclass(slots=True)
class Sample:
    ttfb: float  # seconds from sending the request to the first body byte
    total: float  # seconds from sending the request to the end of the answer
    events: int  # SSE data events received (0 for an unstreamed answer)
    reads: int  # body reads it took: fewer than events when the sender coalesces events into one write


@dataclass(slots=True)
class Tally:
    samples: list[Sample]
    errors: int = 0
    last_error: str = ""


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> Sample | str:
    """Send one request and read its answer; a Sample, or a short description of what went wrong."""
    started = perf_counter()
    first: float | None = None
    events = reads = 0
    tail = b""
    carry = b""  # last bytes of the previous chunk, so a `data:` split across two reads still counts once
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        async for chunk in resp.content.iter_any():
            if first is None:
                first = perf_counter()
            reads += 1
            window = carry + chunk
            events += window.count(b"data:")
            carry = window[-4:]
            tail = window[-32:]
        ended = perf_counter()
        if resp.status != 200:
            return f"HTTP {resp.status}"
    if first is None:
        return "empty answer"
    if stream and b"[DONE]" not in tail:
        return "stream ended without [DONE]"
    return Sample(first - started, ended - started, events, reads)


async def client(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, deadline: float, tally: Tally
) -> None:
    while perf_counter() < deadline:
        try:
            outcome = await one_request(session, url, body, stream)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        if isinstance(outcome, Sample):
            tally.samples.append(outcome)
        else:
            tally.errors += 1
            tally.last_error = outcome
            await asyncio.sleep(0.01)  # a failing target must not turn the client into a busy loop


async def run(url: str, model: str, stream: bool, concurrency: int, duration: float) -> dict[str, object]:
    body = orjson.dumps({"model": model, "messages": PROMPT, "stream": stream})
    tally = Tally(samples=[])
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        started = perf_counter()
        deadline = started + duration
        await asyncio.gather(*(client(session, url, body, stream, deadline, tally) for _ in range(concurrency)))
        elapsed = perf_counter() - started
    totals = [s.total * 1000 for s in tally.samples]
    ttfbs = [s.ttfb * 1000 for s in tally.samples]
    events = sum(s.events for s in tally.samples)
    return {
        "ok": len(tally.samples),
        "errors": tally.errors,
        "last_error": tally.last_error,
        "elapsed_s": elapsed,
        "rps": len(tally.samples) / elapsed,
        "events": events,
        "events_per_s": events / elapsed,
        "events_per_answer": events / len(tally.samples) if tally.samples else math.nan,
        "reads_per_answer": sum(s.reads for s in tally.samples) / len(tally.samples) if tally.samples else math.nan,
        **{f"total_p{p}_ms": percentile(totals, p) for p in (50, 90, 99)},
        **{f"ttfb_p{p}_ms": percentile(ttfbs, p) for p in (50, 90, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="full URL of the chat completions endpoint")
    parser.add_argument("--model", required=True)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    args = parser.parse_args()
    result = uvloop.run(run(args.url, args.model, args.stream, args.concurrency, args.duration))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
