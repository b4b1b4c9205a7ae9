"""Load generator of the `scale` scenario: N concurrent long streams, opened over a ramp, one JSON line out.

`python bench/scale_client.py --url URL --model M --streams N [--ramp S] [--deadline S]`
Opens stream i at i × ramp / N seconds, each on its own connection (one POST, streamed), and reads it to
the end; a stream counts as ok when it answers 200, ends with `data: [DONE]` and then the end of the
chunked body. Streams not finished by `deadline` (from the first start) are closed and count as errors,
so a run is bounded in time. It reports time to the first event (TTFT: from opening the connection to
the first `data:` byte), total time, events, errors by kind and the peak number of streams open at once.

loadgen.py (aiohttp) costs too much per event for 10,000 streams on a shared core: this is a bare
`asyncio.Protocol` on uvloop with a prebuilt request. Each connection is closed with a reset
(SO_LINGER 0) once its answer is complete, so 10,000 closed connections leave no TIME_WAIT behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import orjson
import uvloop
from procs import percentile

LINGER_RESET = struct.pack("ii", 1, 0)
CHUNKED_END = b"\r\n0\r\n\r\n"


@dataclass(slots=True)
class Stream:
    opened: float = 0.0  # perf_counter when the connection was started
    first_event: float = 0.0
    ended: float = 0.0
    events: int = 0
    error: str = ""


@dataclass(slots=True)
class Tally:
    streams: list[Stream] = field(default_factory=list)
    open_now: int = 0
    peak_open: int = 0


class StreamReader(asyncio.Protocol):
    """Sends the request, counts `data:` events as they arrive, notices [DONE] and the end of the body."""

    def __init__(self, request: bytes, stream: Stream, done: asyncio.Future[None]) -> None:
        self.request = request
        self.stream = stream
        self.done = done
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.remaining = -1  # Content-Length left to read, when not chunked
        self.carry = b""  # the tail of the previous read, so a marker split across reads is still found
        self.saw_done = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            self.in_body = True
            status = head.split(" ", 2)[1]
            fields = {
                k.strip().lower(): v.strip().lower() for k, _, v in (x.partition(":") for x in head.split("\r\n")[1:])
            }
            self.chunked = fields.get("transfer-encoding") == "chunked"
            self.remaining = int(fields.get("content-length", "-1"))
            if status != "200":
                self.finish(f"HTTP {status}")
                return
        window = self.carry + data
        count = window.count(b"data:") - self.carry.count(b"data:")
        if count and not self.stream.events:
            self.stream.first_event = time.perf_counter()
        self.stream.events += count
        if not self.saw_done and b"data: [DONE]" in window:
            self.saw_done = True
        self.carry = window[-16:]
        if self.remaining >= 0:
            self.remaining -= len(data)
        if (self.chunked and self.carry.endswith(CHUNKED_END)) or (not self.chunked and self.remaining == 0):
            self.finish("" if self.saw_done else "ended without [DONE]")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.finish(f"closed by the server{': ' + type(exc).__name__ if exc else ''} before the end")

    def finish(self, error: str) -> None:
        """The end of this stream, as `error` ("" for a whole answer); closes the connection."""
        if self.done.done():
            return
        self.stream.ended = time.perf_counter()
        self.stream.error = error
        self.done.set_result(None)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.close()


async def one_stream(host: str, port: int, request: bytes, deadline: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    stream = Stream(opened=time.perf_counter())
    tally.streams.append(stream)
    tally.open_now += 1
    tally.peak_open = max(tally.peak_open, tally.open_now)
    done: asyncio.Future[None] = loop.create_future()
    reader = StreamReader(request, stream, done)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: reader, host, port), deadline - loop.time())
        await asyncio.wait_for(asyncio.shield(done), deadline - loop.time())
    except TimeoutError:
        reader.finish("not finished by the deadline")
    except OSError as exc:
        stream.error = f"connect: {exc.strerror or type(exc).__name__}"
    finally:
        stream.ended = stream.ended or time.perf_counter()
        tally.open_now -= 1


async def run(url: str, model: str, streams: int, ramp: float, deadline_s: float) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    tally = Tally()
    started = time.perf_counter()
    deadline = loop.time() + deadline_s
    tasks = []
    for index in range(streams):
        # Start every stream whose slot has come; sleep (≥1 ms) until the next one's.
        wait = started + index * ramp / streams - time.perf_counter()
        if wait > 0.001:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one_stream(host, port, request, deadline, tally)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    good = [s for s in tally.streams if not s.error]
    errors = Counter(s.error for s in tally.streams if s.error)
    ttft = [1000 * (s.first_event - s.opened) for s in tally.streams if s.first_event]
    total = [s.ended - s.opened for s in good]
    events = sum(s.events for s in tally.streams)
    return {
        "streams": streams,
        "ok": len(good),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors.most_common()),
        "peak_open": tally.peak_open,
        "elapsed_s": elapsed,
        "events": events,
        "events_per_s": events / elapsed,
        **{f"ttft_p{p}_ms": percentile(ttft, p) for p in (50, 90, 99)},
        "ttft_max_ms": max(ttft, default=math.nan),
        **{f"total_p{p}_s": percentile(total, p) for p in (50, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the streams are opened")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds from the first start to give up")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.streams + 64 > hard:
        sys.exit(f"scale_client: {args.streams} streams need {args.streams + 64} open files; the limit is {hard}")
    result = uvloop.run(run(args.url, args.model, args.streams, args.ramp, args.deadline))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
