"""A fault-injecting fake OpenAI-compatible upstream for `make chaos` (bench/chaos.py starts several).

`python bench/chaos_upstream.py --name alpha --port 3101 --seed 1 --mix ok=60,http_500=5,cut=6 ...`
serves `POST /v1/chat/completions` (JSON, or SSE: a role chunk, 4-16 content chunks, a finish chunk,
`data: [DONE]`) and `GET /v1/models`. Each chat request draws one fault from the weighted `--mix`, with a
random generator seeded by `--seed` and `--name` (the sequence of draws is fixed; which request gets
which draw depends on arrival order, so two runs are alike, not identical):

- `ok`, `slow` (pauses below the proxy's idle timeout): a complete answer;
- `http_500`, `http_502`, `http_503`: an OpenAI-shaped JSON error; `http_429` adds `Retry-After: 1`;
- `hang`: nothing for `--hang-seconds` before the headers (set longer than the proxy's `total`, so an
  unstreamed request fails too, not only a stream's `first_byte`);
- `reset`: the request is read, then the connection is reset (TCP RST) before any header;
- `cut`: k of the answer's events (a stream) or half its body (unstreamed) are sent, then a TCP RST;
- `stall`: k events (or half the body), then nothing for `--hang-seconds` (past the idle timeout);
- `error_event`: 200 whose first SSE event (or whole JSON body) is `{"error": ...}`.
For a stream, k is drawn from 0 to the number of events before `[DONE]`: k = 0 fails before the proxy's
commit point (it must fall back), k >= 1 after it (it must end the stream with an error event).

`--flap-every S --flap-down D` stops listening every S seconds for D seconds and resets every open
connection meanwhile (connection refused, as when the process is restarted), to exercise breakers.
`GET /chaos/stats` returns what was injected. Everything listens on the `--host` given (127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import Counter
from typing import Any

import orjson
import uvloop
from aiohttp import web
from procs import until_stopped

FAULTS = (
    "ok",
    "slow",
    "http_500",
    "http_502",
    "http_503",
    "http_429",
    "hang",
    "reset",
    "cut",
    "stall",
    "error_event",
)
# Seconds between two events of a `slow` stream (and a slow unstreamed answer: this times 4): below `idle`.
SLOW_GAP = (0.05, 0.2)


def parse_mix(text: str) -> dict[str, float]:
    """`ok=60,http_500=5` → {"ok": 60.0, "http_500": 5.0}; unknown fault names are an error."""
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")
        mix[name] = float(weight)
    if not mix or sum(mix.values()) <= 0:
        raise ValueError("the fault mix needs at least one positive weight")
    return mix


class Chaos:
    """The seeded fault draw and what was injected so far."""

    def __init__(self, name: str, seed: int, mix: dict[str, float], hang_seconds: float) -> None:
        self.name = name
        self.rng = random.Random(f"{seed}:{name}")
        self.faults = list(mix)
        self.weights = list(mix.values())
        self.hang_seconds = hang_seconds
        self.injected: Counter[str] = Counter()
        self.flaps = 0
        self.dropped_connections = 0

    def __repr__(self) -> str:
        return f"<Chaos {self.name} {dict(self.injected)}>"

    def draw(self) -> str:
        fault = self.rng.choices(self.faults, self.weights)[0]
        self.injected[fault] += 1
        return fault


CHAOS = web.AppKey("chaos", Chaos)


def reset_connection(request: web.Request) -> None:
    """Abort the client's connection with a TCP RST (SO_LINGER 0), as a crashed server's kernel would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _answer(model: str, count: int) -> tuple[dict[str, Any], list[bytes]]:
    """A whole chat.completion and the same answer as SSE events (role, `count` words, finish, [DONE])."""
    ident = f"chatcmpl-chaos{random.getrandbits(40):x}"
    head = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    words = [f"w{i}" for i in range(count)]
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    events += [{**head, "choices": [{"index": 0, "delta": {"content": " " + w}}]} for w in words]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    encoded = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]
    whole = {
        **head,
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": count, "total_tokens": 5 + count},
    }
    return whole, encoded


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    kind = "rate_limit_error" if status == 429 else "server_error"
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def chat(request: web.Request) -> web.StreamResponse:
    chaos = request.app[CHAOS]
    payload: Any = orjson.loads(await request.read())
    fault = chaos.draw()
    rng = chaos.rng
    try:
        if fault.startswith("http_"):
            status = int(fault.removeprefix("http_"))
            headers = {"Retry-After": "1"} if status == 429 else None
            return _error(status, f"chaos {chaos.name}: injected HTTP {status}", headers)
        if fault == "hang":
            await asyncio.sleep(chaos.hang_seconds)
        elif fault == "reset":
            reset_connection(request)
            return web.Response()  # never sent: the transport is gone
        whole, events = _answer(str(payload.get("model")), rng.randint(4, 16))
        if payload.get("stream"):
            return await _stream(request, chaos, fault, events)
        return await _unstreamed(request, chaos, fault, whole)
    except ConnectionError:  # the proxy gave up on us (its timeout) or we reset it ourselves
        return web.Response()


async def _unstreamed(request: web.Request, chaos: Chaos, fault: str, whole: dict[str, Any]) -> web.StreamResponse:
    if fault == "error_event":
        return _error(200, f"chaos {chaos.name}: injected error in a 200 body")
    if fault == "slow":
        await asyncio.sleep(chaos.rng.uniform(*SLOW_GAP) * 4)
    body = orjson.dumps(whole)
    if fault not in ("cut", "stall"):
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if fault == "cut":
        reset_connection(request)
        return response
    await asyncio.sleep(chaos.hang_seconds)
    await response.write(body[len(body) // 2 :])
    await response.write_eof()
    return response


async def _stream(request: web.Request, chaos: Chaos, fault: str, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    if fault == "error_event":
        message = f"chaos {chaos.name}: injected error event"
        await response.write(
            b"data: " + orjson.dumps({"error": {"message": message, "type": "server_error"}}) + b"\n\n"
        )
        await response.write_eof()
        return response
    # Where a cut or stall happens: after k events, k in 0 .. len(events) - 1 (never after [DONE]).
    stop_at = chaos.rng.randint(0, len(events) - 1) if fault in ("cut", "stall") else len(events)
    gaps = [chaos.rng.uniform(*SLOW_GAP) if fault == "slow" else 0.0 for _ in events]
    for index, event in enumerate(events):
        if index == stop_at:
            if fault == "cut":
                reset_connection(request)
                return response
            await asyncio.sleep(chaos.hang_seconds)
        if gaps[index]:
            await asyncio.sleep(gaps[index])
        await response.write(event)
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    body = {"object": "list", "data": [{"id": "chaos-model", "object": "model", "created": 0, "owned_by": "chaos"}]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    chaos = request.app[CHAOS]
    body = {
        "name": chaos.name,
        "injected": dict(chaos.injected),
        "flaps": chaos.flaps,
        "dropped_connections": chaos.dropped_connections,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def create_app(chaos: Chaos) -> web.Application:
    app = web.Application()
    app[CHAOS] = chaos
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/chaos/stats", stats)
    return app


async def flap(runner: web.AppRunner, chaos: Chaos, host: str, port: int, every: float, down: float) -> None:
    """Every `every` seconds: stop listening, reset every open connection, and listen again `down` s later."""
    while True:
        await asyncio.sleep(every)
        for site in list(runner.sites):
            await site.stop()
        assert runner.server is not None
        for handler in runner.server.connections:
            transport = handler.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
                chaos.dropped_connections += 1
        chaos.flaps += 1
        await asyncio.sleep(down)
        await web.TCPSite(runner, host, port, reuse_address=True).start()


async def serve(args: argparse.Namespace) -> None:
    chaos = Chaos(args.name, args.seed, parse_mix(args.mix), args.hang_seconds)
    # handler_cancellation off (aiohttp's default): a handler whose client left finishes on its own.
    runner = web.AppRunner(create_app(chaos), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, reuse_address=True).start()
    flapper = None
    if args.flap_every > 0:
        flapper = asyncio.get_running_loop().create_task(
            flap(runner, chaos, args.host, args.port, args.flap_every, args.flap_down)
        )
    await until_stopped()
    if flapper is not None:
        flapper.cancel()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="upstream name (also seeds its fault draw)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix", default="ok=1", help="fault=weight,... (faults: " + ", ".join(FAULTS) + ")")
    parser.add_argument("--hang-seconds", type=float, default=6.0, help="length of a hang or a stall")
    parser.add_argument("--flap-every", type=float, default=0.0, help="stop listening every S seconds (0: never)")
    parser.add_argument("--flap-down", type=float, default=1.0, help="for this many seconds")
    args = parser.parse_args()
    parse_mix(args.mix)  # fail before listening
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
