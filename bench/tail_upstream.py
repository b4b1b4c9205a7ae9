"""A fake OpenAI-compatible upstream with a heavy-tailed time to first byte: for the `tail` and `pool` scenarios.

`python bench/tail_upstream.py --port P --seed S [--fast-ms 20] [--slow-ms 2000] [--slow-share 0.05]
[--chunks 8] [--chunk-ms 0]`
Every chat request independently draws (from its own seeded generator) slow with probability `slow-share`,
else fast. A streamed answer sends its headers at once, then waits `fast-ms` or `slow-ms` before the first
event (so the first byte of the body is what is late, as with a queueing model server), then a role event,
`chunks` content events `chunk-ms` apart, a finish event and `data: [DONE]`. Unstreamed, it waits the same
and answers one JSON body.

Rule of this module: every chat request that reaches the handler is counted, whatever becomes of it, so
that "upstream requests" includes attempts the proxy cancelled. A request whose client goes away is
cancelled at once (`handler_cancellation`, as a model server aborts a generation nobody reads) and counted
as hung up. `GET /tail/stats` returns the counts; `POST /tail/reset {"seed": S}` zeroes them and reseeds the
draws, so that every run of a scenario meets the same sequence of draws. Not part of manaproxy: a test tool.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import web
from procs import until_stopped


@dataclass(slots=True)
class Tail:
    """The answer's timing, the seeded draws and what was counted since the last reset."""

    seed: int
    fast_s: float
    slow_s: float
    slow_share: float
    chunks: int
    chunk_s: float
    rng: random.Random = field(init=False)
    received: int = 0  # chat requests that reached the handler
    slow: int = 0  # of them, drawn slow
    completed: int = 0  # answered to the end
    hung_up: int = 0  # the client (the proxy) went away first: a cancelled hedge, mostly
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def reset(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.received = self.slow = self.completed = self.hung_up = 0

    def stats(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "received": self.received,
            "slow": self.slow,
            "completed": self.completed,
            "hung_up": self.hung_up,
            "in_flight": self.in_flight,
        }


TAIL = web.AppKey("tail", Tail)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _events(model: str, chunks: int) -> tuple[bytes, list[bytes], bytes]:
    """Role event, content events, finish event + [DONE]."""
    head = {"id": "chatcmpl-tail", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        return _event({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    content = [chunk({"content": f"word{i} " if i else "word0 "}) for i in range(chunks)]
    return chunk({"role": "assistant"}), content, chunk({}, "stop") + b"data: [DONE]\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    tail = request.app[TAIL]
    tail.received += 1
    tail.in_flight += 1
    slow = tail.rng.random() < tail.slow_share
    tail.slow += slow
    wait = tail.slow_s if slow else tail.fast_s
    try:
        payload: Any = orjson.loads(await request.read())
        model = str(payload.get("model", "fake"))
        if not payload.get("stream"):
            await asyncio.sleep(wait + tail.chunks * tail.chunk_s)
            text = "".join(f"word{i} " for i in range(tail.chunks))
            body = {
                "id": "chatcmpl-tail",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": tail.chunks, "total_tokens": 5 + tail.chunks},
            }
            response: web.StreamResponse = web.Response(body=orjson.dumps(body), content_type="application/json")
        else:
            role, content, end = _events(model, tail.chunks)
            response = web.StreamResponse(headers=_SSE_HEADERS)
            await response.prepare(request)
            await asyncio.sleep(wait)
            await response.write(role)
            for event in content:
                if tail.chunk_s:
                    await asyncio.sleep(tail.chunk_s)
                await response.write(event)
            await response.write(end)
            await response.write_eof()
        tail.completed += 1
        return response
    except (asyncio.CancelledError, ConnectionError):
        tail.hung_up += 1
        raise
    finally:
        tail.in_flight -= 1


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[TAIL].stats(), dumps=lambda o: orjson.dumps(o).decode())


async def reset(request: web.Request) -> web.Response:
    tail = request.app[TAIL]
    payload: Any = orjson.loads(await request.read() or b"{}")
    tail.reset(int(payload.get("seed", tail.seed)))
    return web.json_response(tail.stats(), dumps=lambda o: orjson.dumps(o).decode())


async def models(request: web.Request) -> web.Response:
    body = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "tail"}]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def create_app(tail: Tail) -> web.Application:
    app = web.Application()
    app[TAIL] = tail
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/tail/stats", stats)
    app.router.add_post("/tail/reset", reset)
    return app


async def serve(host: str, port: int, tail: Tail) -> None:
    runner = web.AppRunner(create_app(tail), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    await until_stopped()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1, help="seeds the fast/slow draws")
    parser.add_argument("--fast-ms", type=float, default=20.0, help="time to the first event, fast draw")
    parser.add_argument("--slow-ms", type=float, default=2000.0, help="time to the first event, slow draw")
    parser.add_argument("--slow-share", type=float, default=0.05, help="probability of a slow draw")
    parser.add_argument("--chunks", type=int, default=8, help="content events per answer")
    parser.add_argument("--chunk-ms", type=float, default=0.0, help="pause before each content event")
    args = parser.parse_args()
    tail = Tail(args.seed, args.fast_ms / 1000, args.slow_ms / 1000, args.slow_share, args.chunks, args.chunk_ms / 1000)
    uvloop.run(serve(args.host, args.port, tail))


if __name__ == "__main__":
    main()
