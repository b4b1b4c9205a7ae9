"""A slow OpenAI-compatible upstream for the `scale` scenario: thousands of long streams from one process.

`python bench/slow_upstream.py --port P [--chunks 100] [--interval-ms 100]` answers
`POST /v1/chat/completions`: streamed, a role event at once, then one content event every `interval`
(`chunks` of them, on a fixed schedule from the request's arrival), a finish event and `[DONE]`;
unstreamed, one JSON answer at once. `GET /v1/models` answers too (manaproxy's probes).

bench/fake_upstream.py (aiohttp + aiohttp_sse, one task and one `asyncio.sleep` per stream) spends
≈20 µs per event: 10,000 streams at 10 events/s each would need two cores for the upstream alone. This
one is a bare `asyncio.Protocol` on uvloop with one timer callback per event, writing prebuilt HTTP/1.1
chunks, so that the proxy, not the upstream, is what the scenario loads. Keep-alive, no pipelining (the
next request on a connection waits for the current answer). A connection the client closes is answered
with a reset, so that thousands of pooled connections closed by a proxy leave no TIME_WAIT behind.
Not part of manaproxy: a bench tool.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import struct
import time
from typing import cast

import orjson
import uvloop
from procs import until_stopped

WORDS = ("manaproxy", "relays", "this", "slow", "answer", "one", "word", "at", "a", "time")
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _frame(payload: bytes) -> bytes:
    """One SSE event as one HTTP/1.1 chunk."""
    event = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def _json_response(status: str, body: object) -> bytes:
    data = orjson.dumps(body)
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


class Answers:
    """The bytes of every answer, built once per requested model and shared by all streams."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self._streams: dict[str, list[bytes]] = {}

    def stream(self, model: str) -> list[bytes]:
        """[role event, content events..., finish + [DONE] + end of body]: chunks + 2 writes."""
        frames = self._streams.get(model)
        if frames is None:
            head = {
                "id": "chatcmpl-slow",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }

            def event(delta: dict[str, str], finish: str | None = None) -> bytes:
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                return _frame(orjson.dumps({**head, "choices": [choice]}))

            frames = [event({"role": "assistant", "content": ""})]
            frames += [event({"content": (" " if i else "") + WORDS[i % len(WORDS)]}) for i in range(self.chunks)]
            frames.append(event({}, "stop") + _frame(b"[DONE]") + b"0\r\n\r\n")
            self._streams[model] = frames
        return frames

    def whole(self, model: str) -> bytes:
        text = " ".join(WORDS[i % len(WORDS)] for i in range(self.chunks))
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        body = {"id": "chatcmpl-slow", "object": "chat.completion", "model": model, "choices": [choice]}
        return _json_response("200 OK", body)


LINGER_RESET = struct.pack("ii", 1, 0)
MODELS = _json_response("200 OK", {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})


class Connection(asyncio.Protocol):
    """One client connection: parse a request, answer it (streams paced by timers), then the next."""

    def __init__(self, answers: Answers, interval: float) -> None:
        self.answers = answers
        self.interval = interval
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
        self.transport = None

    def eof_received(self) -> bool:
        # The client closed first (a proxy dropping a pooled connection): answer its FIN with a reset, so the
        # closed connection does not wait out TIME_WAIT (60 s) on the client's side.
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.close()
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
            self.transport.write(MODELS)
        elif method == "POST" and path == "/v1/chat/completions":
            request = orjson.loads(body)
            model = str(request.get("model", "fake-model"))
            if request.get("stream"):
                self._start_stream(model)
                return
            self.transport.write(self.answers.whole(model))
        else:
            self.transport.write(_json_response("404 Not Found", {"error": {"message": "not found"}}))
        self._next_request()

    def _start_stream(self, model: str) -> None:
        assert self.transport is not None
        self.frames = self.answers.stream(model)
        self.transport.write(SSE_HEAD + self.frames[0])
        self.sent = 1
        self.started = asyncio.get_running_loop().time()
        self._schedule()

    def _schedule(self) -> None:
        # On a fixed schedule from the start, so a late tick does not delay every later event.
        due = self.started + self.sent * self.interval
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
            self._next_request()


async def serve(host: str, port: int, chunks: int, interval: float, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(chunks)
    server = await loop.create_server(
        lambda: Connection(answers, interval), host, port, backlog=backlog, reuse_address=True
    )
    await until_stopped()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=100, help="content events per streamed answer")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="time between content events")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog (not what is measured)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.host, args.port, args.chunks, args.interval_ms / 1000, args.backlog))


if __name__ == "__main__":
    main()
