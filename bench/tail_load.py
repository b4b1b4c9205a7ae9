"""The client side of the `tail` and `pool` scenarios: a fixed number of streamed requests, closed loop.

`python bench/tail_load.py --url URL --model M --requests N --concurrency C` prints one JSON object: every
answer's time to first token, time to first body byte and total time (ms), who answered it
(`X-Mana-LLM-Resolved`), and the errors. C clients each send a request, read the whole answer and send the
next, until N requests have been sent. TTFT is measured at the client, from sending the request to the
first body byte of an event that carries `delta.content` (the role event before it carries none). An answer
counts only with a 200 and a final `data: [DONE]`. Runs on uvloop, so the client costs little CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import sys
from collections import Counter
from time import perf_counter
from typing import Any

import aiohttp
import orjson
import uvloop

PROMPT = [{"role": "user", "content": "Say something, quickly."}]
_CONTENT = re.compile(rb'"content":\s*"[^"]')  # a non-empty content delta


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[list[Any], str] | str:
    """([ttft_ms, ttfb_ms, total_ms, resolved], "") for a complete answer, else what went wrong."""
    started = perf_counter()
    first = token = None
    carry = b""  # the end of the previous read: `"content":"` may be split across two reads
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        async for chunk in resp.content.iter_any():
            now = perf_counter()
            if first is None:
                first = now
            window = carry + chunk
            if token is None and _CONTENT.search(window):
                token = now
            carry = window[-32:]
        ended = perf_counter()
        resolved = resp.headers.get("X-Mana-LLM-Resolved", "")
        if resp.status != 200:
            return f"HTTP {resp.status}"
    if first is None or token is None:
        return "no content event"
    if not carry.rstrip().endswith(b"data: [DONE]"):
        return "stream ended without [DONE]"
    ms = 1000.0
    return [(token - started) * ms, (first - started) * ms, (ended - started) * ms, resolved], ""


async def run(url: str, model: str, requests: int, concurrency: int, timeout: float) -> dict[str, Any]:
    body = orjson.dumps({"model": model, "messages": PROMPT, "stream": True})
    numbers = itertools.count()
    samples: list[list[Any]] = []
    errors: Counter[str] = Counter()

    async def client(session: aiohttp.ClientSession) -> None:
        while next(numbers) < requests:
            try:
                outcome = await one_request(session, url, body)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                outcome = type(exc).__name__
            if isinstance(outcome, str):
                errors[outcome] += 1
                await asyncio.sleep(0.01)  # a failing target must not turn the client into a busy loop
            else:
                samples.append(outcome[0])

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout, auto_decompress=False) as session:
        started = perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = perf_counter() - started
    return {
        "requests": requests,
        "ok": len(samples),
        "errors": dict(errors),
        "elapsed_s": elapsed,
        "samples": samples,  # [ttft_ms, ttfb_ms, total_ms, resolved], in order of completion
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="full URL of the chat completions endpoint")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request at most")
    args = parser.parse_args()
    result = uvloop.run(run(args.url, args.model, args.requests, args.concurrency, args.timeout))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
