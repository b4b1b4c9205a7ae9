"""The fake OpenAI-compatible upstream of `make demo`, `make bench` and `make chaos`: answers without any LLM,
with its timing and its faults as options.

`python bench/upstream.py --port P [--name N] [--seed S] [--tokens N | --tokens MIN-MAX] [--first-ms F]
[--gap-ms G] [--mix ok=95,late=5,...] [--late-ms L] [--hang-seconds H] [--flap-every S --flap-down D]
[--protocol]` serves `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`, and `GET /stats`,
`POST /reset {"seed": S}` for the harness. It echoes the requested `model`, so a proxy's rewrite is visible.

A chat answer, streamed: the headers at once, a role event after `first-ms`, `tokens` content events (one word
each) `gap-ms` apart, a finish event, a usage event when `stream_options.include_usage` asks, `data: [DONE]`.
Unstreamed: the same words in one JSON body after `first-ms` + `tokens` × `gap-ms`. A range of tokens is drawn
per request. Each chat request draws one fault from the weighted `--mix`, with a generator seeded by `--seed`
and `--name` (the sequence of draws is fixed; which request gets which draw depends on arrival order):
- `ok`: as above; `late`: the first event (or the unstreamed answer) after `late-ms` instead of `first-ms`;
- `slow`: 0.05-0.2 s more before each event (0.2-0.8 s more unstreamed): below `make chaos`'s idle timeout;
- `http_500`, `http_502`, `http_503`: an OpenAI-shaped JSON error; `http_429` adds `Retry-After: 1`;
- `hang`: nothing for `--hang-seconds` before the headers;
- `reset`: the request is read, then the connection is reset (TCP RST) before any header;
- `cut`: k events of a stream (or half the unstreamed body) are sent, then a TCP RST;
- `stall`: k events (or half the body), then nothing for `--hang-seconds`;
- `error_event`: 200 whose first SSE event (or whole JSON body) is `{"error": ...}`.
For a stream, k is drawn from 0 to the number of events before `[DONE]`: k = 0 fails before a proxy's commit
point, k >= 1 after it. `--flap-every S --flap-down D` stops listening every S seconds for D seconds and resets
every open connection meanwhile (connection refused, as when the process is restarted).

Rule of this module: every chat request that reaches the handler is counted, whatever becomes of it, so that
"upstream requests" includes the attempts a proxy cancelled; a request whose client goes away is cancelled at
once (`handler_cancellation`, as a model server aborts a generation nobody reads) and counted as hung up.

`--protocol` swaps aiohttp for a bare `asyncio.Protocol` with one timer callback per event writing prebuilt
HTTP/1.1 chunks, for the `scale` scenario (aiohttp spends ≈20 µs per event: 10,000 streams at 10 events/s
would need two cores for the upstream alone): chat and models only, `ok` answers of a fixed length, events on
a fixed schedule from the request's arrival, keep-alive without pipelining, and a client's FIN answered with a reset so that thousands of pooled
connections closed by a proxy leave no TIME_WAIT behind. Not part of manaproxy: a bench tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import resource
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import count
from typing import Any, cast

import orjson
import uvloop
from aiohttp import web
from aiohttp_sse import sse_response
from procs import until_stopped

FAULTS: tuple[str, ...] = ("ok", "late", "slow", "http_500", "http_502", "http_503", "http_429")
FAULTS += ("hang", "reset", "cut", "stall", "error_event")
SLOW_GAP = (0.05, 0.2)  # seconds more before each event of a `slow` answer (× 4 for an unstreamed one)
ANSWER = "manaproxy relays this answer from a fake upstream: each word arrives as one server-sent event, with only"
WORDS = (ANSWER + " the model field rewritten on the way").split()
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP RST
MODELS = {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}


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


def parse_tokens(text: str) -> tuple[int, int]:
    """`20` → (20, 20); `4-16` → (4, 16): content events per answer, drawn per request from the range."""
    low, _, high = text.partition("-")
    bounds = (int(low), int(high or low))
    if not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"tokens {text!r}: want N or MIN-MAX with 0 <= MIN <= MAX")
    return bounds


@dataclass(slots=True)
class Upstream:
    """The answers' timing and faults, the seeded draws, and what was counted since the last reset."""

    name: str = "fake"
    seed: int = 1
    tokens: tuple[int, int] = (20, 20)
    first_s: float = 0.0
    gap_s: float = 0.0
    late_s: float = 2.0
    mix: dict[str, float] = field(default_factory=lambda: {"ok": 1.0})
    hang_s: float = 6.0
    rng: random.Random = field(init=False, repr=False)
    injected: Counter[str] = field(default_factory=Counter)  # faults drawn
    received: int = 0  # chat requests that reached the handler
    completed: int = 0  # answered as drawn, to the end
    hung_up: int = 0  # the client (a proxy) went away first: a cancelled hedge, a timeout
    in_flight: int = 0
    flaps: int = 0
    dropped_connections: int = 0  # reset by a flap
    ids: count[int] = field(default_factory=count, repr=False)

    def __post_init__(self) -> None:
        self.reset(self.seed)

    def reset(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(f"{seed}:{self.name}")
        self.injected.clear()
        self.received = self.completed = self.hung_up = 0

    def draw(self) -> str:
        if len(self.mix) == 1:  # the bench's plain upstream: no draw to pay for
            fault = next(iter(self.mix))
        else:
            fault = self.rng.choices(list(self.mix), list(self.mix.values()))[0]
        self.injected[fault] += 1
        return fault

    def words(self) -> list[str]:
        low, high = self.tokens
        return [WORDS[i % len(WORDS)] for i in range(low if low == high else self.rng.randint(low, high))]

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "injected": dict(self.injected),
            "received": self.received,
            "completed": self.completed,
            "hung_up": self.hung_up,
            "in_flight": self.in_flight,
            "flaps": self.flaps,
            "dropped_connections": self.dropped_connections,
        }


# -- the answers, as data: shared by both engines --------------------------------------------------------
def chunks(model: str, words: list[str], ident: str, usage: bool) -> list[bytes]:
    """The `data` of every event of a streamed answer: role, one per word, finish, [usage], [DONE]."""
    head = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def event(delta: dict[str, str], finish: str | None = None) -> bytes:
        return orjson.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": word if i == 0 else " " + word}) for i, word in enumerate(words)]
    events.append(event({}, "stop"))
    if usage:
        events.append(orjson.dumps({**head, "choices": [], "usage": _usage(len(words))}))
    return [*events, b"[DONE]"]


def completion(model: str, words: list[str], ident: str) -> bytes:
    message = {"role": "assistant", "content": " ".join(words)}
    body = {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _usage(len(words)),
    }
    return orjson.dumps(body)


def _usage(words: int) -> dict[str, int]:
    return {"prompt_tokens": 9, "completion_tokens": words, "total_tokens": 9 + words}


# -- the aiohttp engine ----------------------------------------------------------------------------------
UPSTREAM = web.AppKey("upstream", Upstream)


def reset_connection(transport: asyncio.BaseTransport | None) -> None:
    """Abort a connection with a TCP RST (SO_LINGER 0), as a crashed server's kernel would."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    cast(asyncio.Transport, transport).abort()


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _error(status: int, message: str) -> web.Response:
    kind = "rate_limit_error" if status == 429 else "server_error"
    body = orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return _json(body, status, {"Retry-After": "1"} if status == 429 else None)


async def chat(request: web.Request) -> web.StreamResponse:
    up = request.app[UPSTREAM]
    up.received += 1
    up.in_flight += 1
    try:
        response = await _answer(request, up, up.draw())
        up.completed += 1
        return response
    except asyncio.CancelledError:
        up.hung_up += 1
        raise
    except ConnectionError:
        up.hung_up += 1
        return web.Response()  # never sent: the client is gone
    finally:
        up.in_flight -= 1


async def _answer(request: web.Request, up: Upstream, fault: str) -> web.StreamResponse:
    payload: Any = orjson.loads(await request.read())
    if fault.startswith("http_"):
        status = int(fault.removeprefix("http_"))
        return _error(status, f"upstream {up.name}: injected HTTP {status}")
    if fault == "hang":
        await asyncio.sleep(up.hang_s)
    elif fault == "reset":
        reset_connection(request.transport)
        return web.Response()  # never sent: the transport is gone
    model, words, ident = str(payload.get("model", "fake-model")), up.words(), f"chatcmpl-{next(up.ids)}"
    first = up.late_s if fault == "late" else up.first_s
    if payload.get("stream"):
        usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        return await _stream(request, up, fault, first, len(words), chunks(model, words, ident, usage))
    if fault == "error_event":
        return _error(200, f"upstream {up.name}: injected error in a 200 body")
    pause = first + len(words) * up.gap_s + (up.rng.uniform(*SLOW_GAP) * 4 if fault == "slow" else 0.0)
    if pause:
        await asyncio.sleep(pause)
    body = completion(model, words, ident)
    if fault not in ("cut", "stall"):
        return _json(body)
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if fault == "cut":
        reset_connection(request.transport)
        return response
    await asyncio.sleep(up.hang_s)
    await response.write(body[len(body) // 2 :])
    await response.write_eof()
    return response


async def _stream(
    request: web.Request, up: Upstream, fault: str, first: float, words: int, events: list[bytes]
) -> web.StreamResponse:
    """Send `events` (role, `words` content events, the rest) as SSE, paced and broken as `fault` says."""
    # Where a cut or stall happens: after k events, k in 0 .. len(events) - 1 (never after [DONE]).
    stop_at = up.rng.randint(0, len(events) - 1) if fault in ("cut", "stall") else len(events)
    async with sse_response(request, ping_interval=3600, allow_all_methods=True) as sse:
        response: web.StreamResponse = sse
        if fault == "error_event":
            error = {"error": {"message": f"upstream {up.name}: injected error event", "type": "server_error"}}
            await sse.send(orjson.dumps(error).decode())
            return response
        for index, data in enumerate(events):
            if index == stop_at:
                if fault == "cut":
                    reset_connection(request.transport)
                    return response
                await asyncio.sleep(up.hang_s)
            pause = first if index == 0 else up.gap_s if index <= words else 0.0
            if fault == "slow":
                pause += up.rng.uniform(*SLOW_GAP)
            if pause:
                await asyncio.sleep(pause)
            await sse.send(data.decode())
    return response


async def embeddings(request: web.Request) -> web.Response:
    payload: Any = orjson.loads(await request.read())
    inputs = payload.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))],
        "model": payload.get("model"),
        "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
    }
    return _json(orjson.dumps(body))


async def models(request: web.Request) -> web.Response:
    return _json(orjson.dumps(MODELS))


async def stats(request: web.Request) -> web.Response:
    return _json(orjson.dumps(request.app[UPSTREAM].stats()))


async def reset(request: web.Request) -> web.Response:
    up = request.app[UPSTREAM]
    payload: Any = orjson.loads(await request.read() or b"{}")
    up.reset(int(payload.get("seed", up.seed)))
    return _json(orjson.dumps(up.stats()))


def create_app(upstream: Upstream) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    return app


async def flap(runner: web.AppRunner, up: Upstream, args: argparse.Namespace) -> None:
    """Every `flap_every` seconds: stop listening, reset every open connection, listen again `flap_down` s later."""
    while True:
        await asyncio.sleep(args.flap_every)
        for site in list(runner.sites):
            await site.stop()
        assert runner.server is not None
        for handler in runner.server.connections:
            if handler.transport is not None:
                reset_connection(handler.transport)
                up.dropped_connections += 1
        up.flaps += 1
        await asyncio.sleep(args.flap_down)
        await web.TCPSite(runner, args.host, args.port, backlog=args.backlog, reuse_address=True).start()


async def serve(up: Upstream, args: argparse.Namespace) -> None:
    runner = web.AppRunner(create_app(up), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port, backlog=args.backlog, reuse_address=True).start()
    flapper = asyncio.get_running_loop().create_task(flap(runner, up, args)) if args.flap_every > 0 else None
    await until_stopped()
    if flapper is not None:
        flapper.cancel()
    await runner.cleanup()


# -- the bare-protocol engine (--protocol) ---------------------------------------------------------------
def _chunk(data: bytes) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _http_json(status: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
NOT_FOUND = _http_json("404 Not Found", orjson.dumps({"error": {"message": "not found"}}))


class Connection(asyncio.Protocol):
    """One client connection: parse a request, answer it (streams paced by timers), then the next."""

    def __init__(self, up: Upstream, streams: dict[str, list[bytes]]) -> None:
        self.up = up
        self.streams = streams  # the frames of every streamed answer, built once per model, shared
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.frames: list[bytes] = []
        self.sent = 0
        self.started = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.frames:
            self.up.hung_up += 1
            self.up.in_flight -= 1
        self.transport = None

    def eof_received(self) -> bool:
        # The client closed first (a proxy dropping a pooled connection): answer its FIN with a reset, so the
        # closed connection does not wait out TIME_WAIT (60 s) on the client's side.
        reset_connection(self.transport)
        return False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.frames:
            self._next_request()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.transport is None:
            return
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ", 2)[:2]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
        if method == "GET" and path.startswith("/v1/models"):
            self.transport.write(_http_json("200 OK", orjson.dumps(MODELS)))
        elif method == "POST" and path == "/v1/chat/completions":
            self.up.received += 1
            request = orjson.loads(body)
            model = str(request.get("model", "fake-model"))
            if request.get("stream"):
                self._start_stream(model)
                return
            self.transport.write(_http_json("200 OK", completion(model, self.up.words(), "chatcmpl-protocol")))
            self.up.completed += 1
        else:
            self.transport.write(NOT_FOUND)
        self._next_request()

    def _start_stream(self, model: str) -> None:
        assert self.transport is not None
        frames = self.streams.get(model)
        if frames is None:
            frames = [_chunk(data) for data in chunks(model, self.up.words(), "chatcmpl-protocol", usage=False)]
            frames[-2:] = [frames[-2] + frames[-1] + b"0\r\n\r\n"]  # finish, [DONE], end of body: one write
            self.streams[model] = frames
        self.frames = frames
        self.up.in_flight += 1
        self.transport.write(SSE_HEAD + frames[0])
        self.sent = 1
        self.started = asyncio.get_running_loop().time()
        self._schedule()

    def _schedule(self) -> None:
        # On a fixed schedule from the start, so a late tick does not delay every later event.
        due = self.started + self.sent * self.up.gap_s
        self.timer = asyncio.get_running_loop().call_at(due, self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(self.frames[self.sent])
        self.sent += 1
        if self.sent < len(self.frames):
            self._schedule()
        else:
            self.frames = []
            self.up.in_flight -= 1
            self.up.completed += 1
            self._next_request()


async def serve_protocol(up: Upstream, args: argparse.Namespace) -> None:
    streams: dict[str, list[bytes]] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(up, streams), args.host, args.port, backlog=args.backlog, reuse_address=True
    )
    await until_stopped()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--name", default="fake", help="shown in errors and /stats; seeds the draws with --seed")
    parser.add_argument("--seed", type=int, default=1, help="seeds the fault draws (and token counts drawn)")
    parser.add_argument("--tokens", type=parse_tokens, default=(20, 20), help="words per answer: N or MIN-MAX (20)")
    parser.add_argument("--first-ms", type=float, default=0.0, help="time to the first event (0)")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause before each content event (0)")
    parser.add_argument("--mix", type=parse_mix, default={"ok": 1.0}, help="fault=weight,... of: " + ", ".join(FAULTS))
    parser.add_argument("--late-ms", type=float, default=2000.0, help="time to the first event of `late` (2000)")
    parser.add_argument("--hang-seconds", type=float, default=6.0, help="length of a hang or a stall (6)")
    parser.add_argument("--flap-every", type=float, default=0.0, help="stop listening every S seconds (0: never)")
    parser.add_argument("--flap-down", type=float, default=1.0, help="for this many seconds (1)")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (not what is measured)")
    parser.add_argument("--protocol", action="store_true", help="bare asyncio.Protocol engine: `ok` only, for scale")
    args = parser.parse_args()
    if args.protocol and (set(args.mix) != {"ok"} or args.first_ms or args.flap_every or len(set(args.tokens)) > 1):
        parser.error("--protocol serves `ok` answers of a fixed length: no --mix, --first-ms, --flap-every, range")
    up = Upstream(
        name=args.name,
        seed=args.seed,
        tokens=args.tokens,
        first_s=args.first_ms / 1000,
        gap_s=args.gap_ms / 1000,
        late_s=args.late_ms / 1000,
        mix=args.mix,
        hang_s=args.hang_seconds,
    )
    # One socket per connection: the scale scenario holds thousands.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run((serve_protocol if args.protocol else serve)(up, args))


if __name__ == "__main__":
    main()
