"""Fake upstreams: real aiohttp servers on loopback that script replies and record what they received.

`FakeUpstream` speaks the OpenAI API, `FakeGemini` (further down) the Gemini REST API the google-genai SDK
uses; `FaultyProvider` is no server but a provider kind that misbehaves on purpose; at the end, answers of the
Responses API (typed events) and tool calls. Usage (see conftest.py for the fixtures that start them):

    up = await make_upstream()
    up.queue(sse_reply(chat_chunks("m", ["Hel", "lo"])))      # next request gets this SSE stream
    up.queue(json_reply({"error": {...}}, status=500))        # the one after gets a 500
    up.default = json_reply(chat_completion("m"))             # every request after that
    ... after the request ...
    up.requests[0].json["model"], up.requests[0].headers["Authorization"]

A behavior is `async def (request, recorded) -> web.StreamResponse`; the factories below cover JSON,
SSE (with pauses, mid-stream cuts and missing [DONE]), bare statuses, hangs and dropped connections.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from manaproxy.failures import CALLERS, PASS_ON, TARGET, MidStreamFailure, UpstreamFailure


@dataclass
class Recorded:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes
    json: Any = None
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)  # set when the proxy hung up on us
    raw_path: str = ""  # the path as sent on the wire (percent-escapes and dot segments intact)


Behavior = Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]]


class ScriptedServer:
    """A real aiohttp server on 127.0.0.1: records each request and answers with the next scripted behavior
    (`queue`), or `default` once the script is used up."""

    def __init__(self, app: web.Application, default: Behavior) -> None:
        self.requests: list[Recorded] = []
        self.script: deque[Behavior] = deque()
        self.default = default
        self._server = TestServer(app, host="127.0.0.1")

    async def start(self) -> Self:
        await self._server.start_server()
        return self

    async def close(self) -> None:
        await self._server.close()

    @property
    def port(self) -> int:
        assert self._server.port is not None
        return self._server.port

    def queue(self, *behaviors: Behavior) -> None:
        self.script.extend(behaviors)

    async def answer(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        """Record `recorded` and play the next behavior; note when the proxy hangs up on it."""
        self.requests.append(recorded)
        behavior = self.script.popleft() if self.script else self.default
        try:
            return await behavior(request, recorded)
        except (asyncio.CancelledError, ConnectionError):
            recorded.disconnected.set()
            raise


class FakeUpstream(ScriptedServer):
    """An OpenAI-compatible server whose answers the test scripts."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.models: list[str] = ["fake-model"]
        self.models_status = 200
        self.models_delay = 0.0
        self.models_calls = 0
        app = web.Application(client_max_size=64 * 1024 * 1024)  # as a real API: what the proxy lets through
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        super().__init__(app, json_reply(chat_completion("fake-model")))

    def __repr__(self) -> str:
        return f"<FakeUpstream {self.name} {self.base_url} requests={len(self.requests)}>"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        """Requests received other than GET /v1/models."""
        return len(self.requests)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.models_calls += 1
        if self.models_delay:
            await asyncio.sleep(self.models_delay)
        if self.models_status != 200:
            return web.json_response({"error": {"message": "models failed"}}, status=self.models_status)
        data = [{"id": model, "object": "model", "created": 0, "owned_by": self.name} for model in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        recorded = Recorded(
            request.method, request.path, dict(request.headers), body, parsed, raw_path=request.raw_path
        )
        return await self.answer(request, recorded)


# -- bodies ------------------------------------------------------------------------------------------


def chat_completion(model: str, content: str = "Hello!", *, usage: tuple[int, int] | None = (5, 2)) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return body


def chat_chunks(model: str, words: Iterable[str], *, usage: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """OpenAI-style chunks: a role chunk, one per word, a finish chunk and an optional usage chunk."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    chunks += [{**head, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage is not None:
        chunks.append(
            {
                **head,
                "choices": [],
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
            }
        )
    return chunks


def text_completion(model: str, text: str = "Hello!") -> dict[str, Any]:
    """A legacy `/v1/completions` answer."""
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }


def text_completion_chunks(model: str, words: Iterable[str]) -> list[dict[str, Any]]:
    """Legacy `/v1/completions` stream chunks, one per word."""
    head = {"id": "cmpl-1", "object": "text_completion", "created": 1700000000, "model": model}
    return [{**head, "choices": [{"index": 0, "text": w, "finish_reason": None, "logprobs": None}]} for w in words]


def error_body(message: str = "boom", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


# -- behaviors ---------------------------------------------------------------------------------------


def json_reply(body: Any, status: int = 200, headers: Mapping[str, str] | None = None, delay: float = 0.0) -> Behavior:
    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)

    return behave


def raw_reply(
    body: bytes, status: int = 200, content_type: str = "text/plain", headers: Mapping[str, str] | None = None
) -> Behavior:
    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)

    return behave


def sse_event(item: Any) -> bytes:
    """`data: <json>\\n\\n` for dicts, the text as given for bytes/str (e.g. comments, `[DONE]`)."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return b"data: " + orjson.dumps(item) + b"\n\n"


def sse_reply(
    events: Iterable[Any],
    *,
    done: bool = True,
    delay: float = 0.0,
    first_delay: float = 0.0,
    cut_after: int | None = None,
    hang_after: int | None = None,
    status: int = 200,
) -> Behavior:
    """Stream `events` (dicts → `data:` JSON events; bytes/str sent verbatim).

    `cut_after=n`: drop the connection after n events (a mid-stream cut, no terminating chunk).
    `hang_after=n`: stop sending after n events and keep the connection open.
    `done`: send `data: [DONE]` at the end.
    """
    payloads = [sse_event(item) for item in events]
    if done:
        payloads.append(b"data: [DONE]\n\n")

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        response = web.StreamResponse(
            status=status, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        if first_delay:
            await asyncio.sleep(first_delay)
        for index, payload in enumerate(payloads):
            if cut_after is not None and index == cut_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            if hang_after is not None and index == hang_after:
                await asyncio.sleep(3600)
            if delay and index:
                await asyncio.sleep(delay)
            await response.write(payload)
        await response.write_eof()
        return response

    return behave


def chat_answer(model: str, *, usage: tuple[int, int] = (5, 2)) -> Behavior:
    """A chat answer as the request asks for it: an SSE stream to `stream: true`, one JSON document otherwise."""
    streamed = sse_reply(chat_chunks(model, ["Hel", "lo"], usage=usage))
    unstreamed = json_reply(chat_completion(model, usage=usage))

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        stream = isinstance(recorded.json, dict) and recorded.json.get("stream") is True
        return await (streamed if stream else unstreamed)(request, recorded)

    return behave


def hang(seconds: float = 3600.0) -> Behavior:
    """Accept the request and answer nothing (not even headers) for `seconds`."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=504)

    return behave


def after(event: asyncio.Event, then: Behavior) -> Behavior:
    """Hold the request (no headers sent) until the test sets `event`, then behave as `then`."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        await event.wait()
        return await then(request, recorded)

    return behave


def drop_connection() -> Behavior:
    """Close the connection without any response."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response(status=500)  # never sent

    return behave


def status_reply(status: int, message: str = "upstream error", headers: Mapping[str, str] | None = None) -> Behavior:
    return json_reply(error_body(message, code=str(status)), status=status, headers=headers)


def stream_bytes(
    pieces: Iterable[bytes],
    *,
    pause: float = 0.02,
    status: int = 200,
    content_type: str = "text/event-stream",
    cut: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Behavior:
    """Send `pieces` verbatim, one write each with a pause between, so each tends to be its own TCP segment.

    `cut`: drop the connection after the last piece instead of ending the body cleanly. `headers`: more
    response headers.
    """
    parts = list(pieces)

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={**(headers or {}), "Content-Type": content_type})
        await response.prepare(request)
        for index, part in enumerate(parts):
            if index and pause:
                await asyncio.sleep(pause)
            await response.write(part)
        if cut:
            await asyncio.sleep(pause)  # let the last piece leave before the reset
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    return behave


def embedding_reply(vectors: list[list[float]]) -> Behavior:
    """An embeddings answer that honours `encoding_format` (the openai SDK asks for base64 by default)."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        as_base64 = isinstance(recorded.json, dict) and recorded.json.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                if as_base64
                else vector,
            }
            for index, vector in enumerate(vectors)
        ]
        model = recorded.json.get("model") if isinstance(recorded.json, dict) else None
        body = {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    return behave


def closed_port_url() -> str:
    """A loopback base URL where nothing listens (connection refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll `predicate` until true (for effects that happen after a response, like a closed upstream)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s")
        await asyncio.sleep(interval)


def echo_credentials(status: int = 400, *, shape: str = "openai") -> Behavior:
    """An error that quotes the `Authorization` header it received, as careless upstreams do.

    `shape`: `openai` (an OpenAI-shaped JSON error), `json` (`{"message": ...}`, which the proxy wraps in
    an error of its own quoting the message) or `text` (text/plain).
    """

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        echoed = f"rejected request with Authorization: {request.headers.get('Authorization', '')}"
        if shape == "text":
            return web.Response(status=status, text=echoed)
        body = error_body(echoed) if shape == "openai" else {"message": echoed}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    return behave


def gated_stream(gate: asyncio.Event, model: str = "m1") -> Behavior:
    """An SSE answer that sends its first event, waits for `gate`, then finishes with [DONE]."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        chunks = chat_chunks(model, ["one", "two"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_event(chunks[0]))
        await gate.wait()
        for chunk in chunks[1:]:
            await response.write(sse_event(chunk))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    return behave


# -- the fake Gemini ---------------------------------------------------------------------------------------

GEMINI_MODEL = "gemini-2.5-flash"


class FakeGemini(ScriptedServer):
    """A scriptable Gemini API on 127.0.0.1, as the google-genai SDK calls it: `POST
    /v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse`, `:batchEmbedContents` and
    `GET /v1beta/models`. Every request is recorded, so tests assert on the body the SDK really sent."""

    def __init__(self) -> None:
        self.models: list[dict[str, Any]] = [
            {"name": "models/gemini-2.5-flash", "supportedGenerationMethods": ["generateContent", "countTokens"]},
            {"name": "models/text-embedding-004", "supportedGenerationMethods": ["embedContent"]},
            {"name": "models/imagen-4.0-generate-001", "supportedGenerationMethods": ["predict"]},
        ]
        self.models_status = 200
        app = web.Application()
        app.router.add_get("/v1beta/models", self._list)
        app.router.add_post("/v1beta/models/{target}", self._call)
        super().__init__(app, json_reply(gemini_answer("Hello!")))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    async def _list(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Recorded(request.method, request.path_qs, dict(request.headers), b""))
        if self.models_status != 200:
            return gemini_error(self.models_status, "listing failed", "UNAVAILABLE")
        return web.json_response({"models": self.models})

    async def _call(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded = Recorded(request.method, request.path_qs, dict(request.headers), body, orjson.loads(body))
        return await self.answer(request, recorded)


# What Google answers for a wrong, expired or deleted API key: a 400, not a 401/403.
GEMINI_KEY_NOT_VALID = "API key not valid. Please pass a valid API key."
GEMINI_KEY_INVALID_INFO = [
    {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
]


class KeyRejectingGemini(FakeGemini):
    """A Gemini that rejects the key on every call, model listing included."""

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return gemini_error(400, GEMINI_KEY_NOT_VALID, "INVALID_ARGUMENT", details=GEMINI_KEY_INVALID_INFO)


def gemini_answer(
    text: str = "Hello!",
    *,
    finish: str | None = "STOP",
    usage: tuple[int, int] | None = (7, 3),
    parts: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """A GenerateContentResponse body with one candidate."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts or [{"text": text}]}, "index": index}
    if finish is not None:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {"candidates": [candidate], "responseId": "resp-1", "modelVersion": GEMINI_MODEL}
    if usage is not None:
        body["usageMetadata"] = {
            "promptTokenCount": usage[0],
            "candidatesTokenCount": usage[1],
            "totalTokenCount": sum(usage),
        }
    return body


def gemini_chunks(words: Iterable[str], usage: tuple[int, int] = (7, 3)) -> list[dict[str, Any]]:
    """A streamed answer: one chunk per word, the last with the finish reason and usage."""
    words = list(words)
    out = [gemini_answer(word, finish=None, usage=None) for word in words[:-1]]
    out.append(gemini_answer(words[-1], usage=usage))
    return out


def gemini_error(status: int, message: str, status_name: str, details: list[Any] | None = None) -> web.Response:
    """A Google-shaped error: `{"error": {"code", "message", "status"[, "details"]}}`."""
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details is not None:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def gemini_error_reply(status: int, message: str = "boom", status_name: str = "INTERNAL", **kw: Any) -> Behavior:
    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        return gemini_error(status, message, status_name, **kw)

    return behave


def gemini_stream(
    items: Iterable[dict[str, Any]], *, cut_after: int | None = None, hang_after: int | None = None
) -> Behavior:
    """SSE as Google sends it (`data: {json}` + CRLF CRLF); `cut_after`/`hang_after` n events."""
    payloads = [b"data: " + orjson.dumps(item) + b"\r\n\r\n" for item in items]

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        assert request.query.get("alt") == "sse"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, payload in enumerate(payloads):
            if index == cut_after:
                assert request.transport is not None
                request.transport.abort()
                return response
            if index == hang_after:
                await asyncio.sleep(3600)
            await response.write(payload)
        await response.write_eof()
        return response

    return behave


# -- a provider kind that misbehaves on purpose --------------------------------------------------------------

FAULTY_KIND = "tests.fakes:FaultyProvider"


class FaultyProvider:
    """A provider kind a test registers to make a provider module misbehave the ways the real kinds must not:
    `monkeypatch.setitem(KINDS, "faulty", FAULTY_KIND)`, then `kind: faulty` in the config (its `base_url` is
    never called). The chain entry's model names what `send` does:

    - `raises`: raises a RuntimeError, as a bug in a provider module would;
    - `breaks-contract`: returns something that is neither a `Reply` nor a `StreamReply`;
    - `stream`: a stream of three events that ends complete, reporting usage (3 prompt, 4 completion tokens);
    - `stream-held`: a stream that sends its first event, then nothing until it is closed;
    - `stream-gated`: a stream that sends its first event, then the rest once the test sets `gate`;
    - `stream-raises`: a stream whose next event raises a RuntimeError after the first;
    - `stream-fails`: a stream that fails after its first event as the contract says (`MidStreamFailure`);
    - `stream-short`: a stream that ends after two events without its end (`[DONE]`), so incomplete;
    - `caller:<text>` / `fallback:<text>`: fails before the first byte with `<text>` (the client's own words
      when it names the model) as its reason, as the caller's error or as a failure that falls back.

    Its probe raises a RuntimeError when the provider's `probe` setting is `/raises`, and succeeds otherwise.
    It counts its probes and records, for each stream, the `reuse` its `close` was called with; it counts
    the streams open (sent, not yet closed) and, for each `aclose`, how many were open then.
    """

    def __init__(self, config: Any, session: Any, redactor: Any, server: Any) -> None:
        self.config = config
        self.probes = 0
        self.closed_with: list[bool] = []
        self.open_streams = 0
        self.open_at_aclose: list[int] = []
        self.gate = asyncio.Event()

    async def send(self, call: Any) -> Any:
        model = call.target.model
        if model == "raises":
            raise RuntimeError("a bug in the provider module")
        if model == "breaks-contract":
            return object()
        if model.startswith("stream"):
            return FaultyStream(self, model, str(call.target))
        kind, _, text = model.partition(":")
        caller = kind == "caller"
        raise UpstreamFailure(
            text,
            f"failed: {text}",
            verdict=CALLERS if caller else PASS_ON,
            scope=TARGET,
            status=400 if caller else None,
        )

    async def list_models(self, timeout: float) -> list[str]:
        return []

    async def probe(self, timeout: float) -> None:
        self.probes += 1
        if self.config.probe == "/raises":
            raise RuntimeError("a bug in the provider's probe")

    async def aclose(self) -> None:
        self.open_at_aclose.append(self.open_streams)


class FaultyStream:
    """The stream of a `FaultyProvider` (see there)."""

    def __init__(self, provider: FaultyProvider, model: str, resolved: str) -> None:
        self.status = 200
        self.headers: list[tuple[str, str]] = []
        self.first = sse_event(
            {"id": "faulty-1", "model": resolved, "choices": [{"index": 0, "delta": {"content": "one"}}]}
        )
        self.complete = False
        self.usage: tuple[int, int] | None = None
        self._provider = provider
        self._model = model
        self._resolved = resolved
        self._closed = asyncio.Event()
        provider.open_streams += 1

    async def events(self) -> Any:
        if self._model == "stream-held":
            await self._closed.wait()
        if self._model == "stream-gated":
            await self._provider.gate.wait()
        if self._model == "stream-raises":
            raise RuntimeError("a bug while relaying")
        if self._model == "stream-fails":
            raise MidStreamFailure("upstream_error", "the faulty upstream failed mid-stream")
        for word in ("two",) if self._model == "stream-short" else ("two", "three"):
            yield sse_event(
                {
                    "id": "faulty-1",
                    "model": self._resolved,
                    "choices": [{"index": 0, "delta": {"content": word}}],
                }
            )
        if self._model == "stream-short":
            return
        self.complete = True
        self.usage = (3, 4)
        yield b"data: [DONE]\n\n"

    def close(self, *, reuse: bool) -> None:
        if not self._closed.is_set():
            self._provider.open_streams -= 1
        self._provider.closed_with.append(reuse)
        self._closed.set()


# -- the Responses API, and tool calls -------------------------------------------------------------------------

RESPONSE_WORDS = ["Hello", ", ", "world"]


def response_object(model: str, status: str, text: str = "") -> dict[str, Any]:
    """A Responses API `response` object; `text` becomes one output message."""
    output = []
    if text:
        output = [
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    response: dict[str, Any] = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }
    if status == "completed":
        response["usage"] = {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    return response


def typed_events(model: str, *, cut_after: int | None = None, end: str = "response.completed") -> list[bytes]:
    """The SSE events of a Responses stream answering RESPONSE_WORDS: `event: <type>` + `data: {..., "type":
    <type>}`, ending with `end` (`response.completed`, `.incomplete` or `.failed`), no [DONE]."""
    message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    text = "".join(RESPONSE_WORDS)
    items: list[dict[str, Any]] = [
        {"type": "response.created", "response": response_object(model, "in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": message},
        {"type": "response.content_part.added", **where, "part": part},
    ]
    items += [{"type": "response.output_text.delta", **where, "delta": word, "logprobs": []} for word in RESPONSE_WORDS]
    done_part = {**part, "text": text}
    items += [
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": done_part},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": {**message, "status": "completed", "content": [done_part]},
        },
    ]
    final = "completed" if end == "response.completed" else end.removeprefix("response.")
    items.append({"type": end, "response": response_object(model, final, text)})
    events = []
    for number, item in enumerate(items):
        item["sequence_number"] = number
        events.append(b"event: " + item["type"].encode() + b"\ndata: " + orjson.dumps(item) + b"\n\n")
    return events[:cut_after] if cut_after is not None else events


def responses_stream(events: list[bytes], *, cut: bool = False) -> Behavior:
    """Send `events` as an SSE body, then end it (or, with `cut`, drop the connection)."""
    return stream_bytes(events, pause=0.0, cut=cut)


def tool_call_completion(model: str, name: str, arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    """A chat completion whose answer is one call of the tool `name` with `arguments` (a JSON text)."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    body = chat_completion(model, usage=(20, 9))
    body["choices"] = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "tool_calls": [call]},
            "finish_reason": "tool_calls",
        }
    ]
    return body


def tool_call_chunks(model: str, name: str, arguments: str, call_id: str = "call_1") -> list[dict[str, Any]]:
    """The same call streamed: its id and name first, then the arguments in two pieces, then the finish."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    half = len(arguments) // 2
    deltas: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            ],
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]},
    ]
    chunks = [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return chunks


# -- every provider kind, scripted alike: the provider contract suite (test_provider_contract.py) ---------------

# Our provider key in the contract suite: of no known key shape, so only the configured key's redaction hides it.
CONTRACT_KEY = "contract-provider-key-0123456789"
CONTRACT_USAGE = (6, 4)  # (prompt, completion) tokens of every scripted answer that reports usage


def headers_quoting(key: str) -> dict[str, str]:
    """Response headers a client would get relayed (`headers.py`), each quoting `key`."""
    return {"x-ratelimit-note": f"key {key} is near its limit", "x-request-id": key, "openai-echo": f"Bearer {key}"}


class ScriptedKind:
    """A provider kind and what stands behind it, scripted alike whatever the kind, so that one contract test
    runs against every kind. Each script method sets up how the provider under test (named as its kind)
    answers next; `model` is the model its chain entry names (the faulty kind plays a script by its model).
    A kind that cannot play a script leaves it unimplemented: the suite runs each behaviour with the kinds it
    applies to."""

    name = ""
    model = ""
    usage = CONTRACT_USAGE  # what the scripted answers report

    def spec(self) -> dict[str, Any]:
        """The provider's settings (its key included)."""
        raise NotImplementedError

    def answer(self) -> None:
        """An unstreamed answer reporting `usage`."""
        raise NotImplementedError

    def stream(self) -> None:
        """A streamed answer of a few events, reporting `usage` when the request asks for it."""
        raise NotImplementedError

    def larger_answer(self, size: int) -> None:
        """An unstreamed answer of more than `size` bytes."""
        raise NotImplementedError

    def larger_first_event(self, size: int) -> None:
        """A stream whose first event is more than `size` bytes."""
        raise NotImplementedError

    def larger_later_event(self, size: int) -> None:
        """A stream whose first event is small and whose second is more than `size` bytes."""
        raise NotImplementedError

    def cut_after_first(self) -> None:
        """A stream that fails after its first event."""
        raise NotImplementedError

    def silent_after_first(self) -> None:
        """A stream that sends its first event, then nothing, its connection open."""
        raise NotImplementedError

    def end_short(self) -> None:
        """A stream whose body ends cleanly, but before the protocol's end (no `[DONE]`, no finish reason)."""
        raise NotImplementedError

    def silent_before_first(self) -> None:
        """An answer that never begins."""
        raise NotImplementedError

    def stream_until_released(self) -> None:
        """A stream that sends its first event, then the rest once `release` is called."""
        raise NotImplementedError

    def release(self, provider: Any) -> None:
        raise NotImplementedError

    def echo_key_error(self, status: int) -> None:
        """An error with this status whose body and headers quote our key."""
        raise NotImplementedError

    def echo_key_answer(self, *, stream: bool) -> None:
        """An answer whose headers quote our key."""
        raise NotImplementedError

    def echo_key_event(self) -> None:
        """A stream whose second event is an error quoting our key."""
        raise NotImplementedError

    def upstream_hung_up(self, provider: Any) -> bool:
        """Whether the upstream exchange of the latest request was torn down by us."""
        raise NotImplementedError

    def held(self, provider: Any) -> list[str]:
        """What `provider` holds of its own that `aclose` must release, still open."""
        raise NotImplementedError


class OpenAIKind(ScriptedKind):
    """The `openai` kind in front of a `FakeUpstream`."""

    name = "openai"
    model = "m1"

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self._gate = asyncio.Event()

    def _chunks(self, words: list[str], usage: tuple[int, int] | None = None) -> list[bytes]:
        return [sse_event(chunk) for chunk in chat_chunks("upstream-name", words, usage=usage)]

    def spec(self) -> dict[str, Any]:
        return {"base_url": self.upstream.base_url, "api_key": CONTRACT_KEY}

    def answer(self) -> None:
        self.upstream.queue(json_reply(chat_completion("upstream-name", usage=self.usage)))

    def stream(self) -> None:
        self.upstream.queue(sse_reply(chat_chunks("upstream-name", ["Hel", "lo", "!"], usage=self.usage)))

    def larger_answer(self, size: int) -> None:
        self.upstream.queue(json_reply(chat_completion("upstream-name", "x" * size)))

    def larger_first_event(self, size: int) -> None:
        self.upstream.queue(stream_bytes([*self._chunks(["x" * size, "end"])[1:], b"data: [DONE]\n\n"]))

    def larger_later_event(self, size: int) -> None:
        self.upstream.queue(stream_bytes([*self._chunks(["one ", "x" * size, "end"]), b"data: [DONE]\n\n"]))

    def cut_after_first(self) -> None:
        self.upstream.queue(sse_reply(chat_chunks("upstream-name", ["one ", "two ", "three"]), cut_after=2))

    def silent_after_first(self) -> None:
        self.upstream.queue(sse_reply(chat_chunks("upstream-name", ["one ", "two ", "three"]), hang_after=2))

    def silent_before_first(self) -> None:
        self.upstream.queue(hang())

    def end_short(self) -> None:
        self.upstream.queue(sse_reply(chat_chunks("upstream-name", ["one ", "two"]), done=False))

    def stream_until_released(self) -> None:
        events = self._chunks(["one ", "two"])
        self.upstream.queue(stream_bytes_after(events[:1], self._gate, [*events[1:], b"data: [DONE]\n\n"]))

    def release(self, provider: Any) -> None:
        self._gate.set()

    def echo_key_error(self, status: int) -> None:
        body = error_body(f"rejected key {CONTRACT_KEY}")
        self.upstream.queue(json_reply(body, status=status, headers=headers_quoting(CONTRACT_KEY)))

    def echo_key_answer(self, *, stream: bool) -> None:
        headers = headers_quoting(CONTRACT_KEY)
        if stream:
            events = [*self._chunks(["Hel", "lo"]), b"data: [DONE]\n\n"]
            self.upstream.queue(stream_bytes(events, headers=headers))
        else:
            self.upstream.queue(json_reply(chat_completion("upstream-name"), headers=headers))

    def echo_key_event(self) -> None:
        error = sse_event(error_body(f"upstream rejected key {CONTRACT_KEY} mid-answer"))
        self.upstream.queue(stream_bytes([*self._chunks(["one "])[:2], error]))

    def upstream_hung_up(self, provider: Any) -> bool:
        return self.upstream.requests[-1].disconnected.is_set()

    def held(self, provider: Any) -> list[str]:
        return []  # its connections are pooled in the application's session


class GoogleKind(ScriptedKind):
    """The `google` kind (google-genai) in front of a `FakeGemini`."""

    name = "google"
    model = GEMINI_MODEL

    def __init__(self, gemini: FakeGemini) -> None:
        self.gemini = gemini
        self._gate = asyncio.Event()

    def spec(self) -> dict[str, Any]:
        return {"kind": "google", "base_url": self.gemini.base_url, "api_key": CONTRACT_KEY}

    def answer(self) -> None:
        self.gemini.queue(json_reply(gemini_answer("Hello!", usage=self.usage)))

    def stream(self) -> None:
        self.gemini.queue(gemini_stream(gemini_chunks(["Hel", "lo", "!"], usage=self.usage)))

    def larger_answer(self, size: int) -> None:
        self.gemini.queue(json_reply(gemini_answer("x" * size)))

    def larger_first_event(self, size: int) -> None:
        self.gemini.queue(gemini_stream([gemini_answer("x" * size, finish=None, usage=None), gemini_answer("end")]))

    def larger_later_event(self, size: int) -> None:
        # Written apart (`stream_bytes` pauses between writes): the SDK reads ahead, and a first read that
        # holds the start of the large event too fails before the first event, which is the other case.
        chunks = [gemini_answer("one ", finish=None, usage=None), gemini_answer("x" * size), gemini_answer("end")]
        self.gemini.queue(stream_bytes([b"data: " + orjson.dumps(chunk) + b"\r\n\r\n" for chunk in chunks], pause=0.05))

    def cut_after_first(self) -> None:
        self.gemini.queue(gemini_stream(gemini_chunks(["one ", "two ", "three"]), cut_after=1))

    def silent_after_first(self) -> None:
        self.gemini.queue(gemini_stream(gemini_chunks(["one ", "two ", "three"]), hang_after=1))

    def silent_before_first(self) -> None:
        self.gemini.queue(hang())

    def end_short(self) -> None:
        self.gemini.queue(gemini_stream([gemini_answer(word, finish=None, usage=None) for word in ("one ", "two")]))

    def stream_until_released(self) -> None:
        events = [b"data: " + orjson.dumps(chunk) + b"\r\n\r\n" for chunk in gemini_chunks(["one ", "two"])]
        self.gemini.queue(stream_bytes_after(events[:1], self._gate, events[1:]))

    def release(self, provider: Any) -> None:
        self._gate.set()

    def echo_key_error(self, status: int) -> None:
        names = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
        error = {"code": status, "message": f"rejected key {CONTRACT_KEY}", "status": names.get(status, "INTERNAL")}
        self.gemini.queue(json_reply({"error": error}, status=status, headers=headers_quoting(CONTRACT_KEY)))

    def echo_key_answer(self, *, stream: bool) -> None:
        headers = headers_quoting(CONTRACT_KEY)
        if stream:
            events = [b"data: " + orjson.dumps(chunk) + b"\r\n\r\n" for chunk in gemini_chunks(["Hel", "lo"])]
            self.gemini.queue(stream_bytes(events, headers=headers))
        else:
            self.gemini.queue(json_reply(gemini_answer("Hello!"), headers=headers))

    def echo_key_event(self) -> None:
        first = b"data: " + orjson.dumps(gemini_answer("one ", finish=None, usage=None)) + b"\r\n\r\n"
        error = {"error": {"code": 500, "message": f"upstream rejected key {CONTRACT_KEY}", "status": "INTERNAL"}}
        self.gemini.queue(stream_bytes([first, b"data: " + orjson.dumps(error) + b"\r\n\r\n"]))

    def upstream_hung_up(self, provider: Any) -> bool:
        return self.gemini.requests[-1].disconnected.is_set()

    def held(self, provider: Any) -> list[str]:
        api = provider._client._api_client
        clients = {"the SDK's async HTTP client": api._async_httpx_client, "the SDK's HTTP client": api._httpx_client}
        held = [name for name, client in clients.items() if client is not None and not client.is_closed]
        return held + [f"{len(provider._closing)} stream(s) being closed"] * bool(provider._closing)


class FaultyKind(ScriptedKind):
    """The faulty test kind (`FaultyProvider`): no upstream, each script a model it plays."""

    name = "faulty"
    model = "stream"
    usage = (3, 4)

    def spec(self) -> dict[str, Any]:
        return {"kind": "faulty", "base_url": "http://127.0.0.1:9/v1", "api_key": CONTRACT_KEY}

    def stream(self) -> None:
        self.model = "stream"

    def cut_after_first(self) -> None:
        self.model = "stream-fails"

    def silent_after_first(self) -> None:
        self.model = "stream-held"

    def end_short(self) -> None:
        self.model = "stream-short"

    def stream_until_released(self) -> None:
        self.model = "stream-gated"

    def release(self, provider: Any) -> None:
        provider.gate.set()

    def upstream_hung_up(self, provider: Any) -> bool:
        return provider.closed_with[-1:] == [False]

    def held(self, provider: Any) -> list[str]:
        if not provider.open_at_aclose:
            return ["the provider (not closed)"]
        return [f"{open_streams} stream(s) open at aclose" for open_streams in provider.open_at_aclose if open_streams]


def stream_bytes_after(before: list[bytes], gate: asyncio.Event, after: list[bytes]) -> Behavior:
    """An SSE body: `before`, then, once `gate` is set, `after`."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in before:
            await response.write(part)
        await gate.wait()
        for part in after:
            await response.write(part)
        await response.write_eof()
        return response

    return behave


def usage_stream(model: str, words: Iterable[str], *, usage: tuple[int, int] = (9, 4)) -> Behavior:
    """A stream as OpenAI sends it: with `stream_options: {"include_usage": true}` in the request, every chunk
    carries `"usage":null` and a last chunk (`"choices":[]`) the usage; without it, no usage at all."""
    words = list(words)

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        options = recorded.json.get("stream_options") if isinstance(recorded.json, dict) else None
        asked = isinstance(options, dict) and options.get("include_usage") is True
        chunks = chat_chunks(model, words, usage=usage if asked else None)
        if asked:
            chunks = [chunk if chunk.get("choices") == [] else {**chunk, "usage": None} for chunk in chunks]
        return await sse_reply(chunks)(request, recorded)

    return behave


# -- SSE bytes for the byte-level tests (test_sse.py, test_protocols.py) ------------------------------------


def chunk(model: str = "m", content: str = "hi", **extra: Any) -> dict[str, Any]:
    """An OpenAI chat.completion.chunk object (OpenAI key order: model before choices)."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        **extra,
    }


def data(obj: Any, *, sep: bytes = b"\n\n") -> bytes:
    """`obj` as one SSE `data:` event."""
    return b"data: " + orjson.dumps(obj) + sep


def refuses_stream_options(then: Behavior) -> Behavior:
    """A server that does not know `stream_options`: 400 naming it when the request has it, else `then`."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        if isinstance(recorded.json, dict) and "stream_options" in recorded.json:
            body = error_body("Unrecognized request argument supplied: stream_options")
            return web.json_response(body, status=400)
        return await then(request, recorded)

    return behave


# -- issue 16's upstreams: replies chosen by the request, and an upstream that restarts ---------------------

# llama.cpp's answer to an image sent to a text-only model.
NO_IMAGES = "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"


def by_body(when: Callable[[Recorded], bool], then: Behavior, otherwise: Behavior) -> Behavior:
    """A behavior: `then` for requests `when` matches, `otherwise` for the rest."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        return await (then if when(recorded) else otherwise)(request, recorded)

    return behave


def has_image(recorded: Recorded) -> bool:
    return b'"image_url"' in recorded.body


def is_embedding(recorded: Recorded) -> bool:
    return recorded.path.endswith("/embeddings")


class Restarting:
    """An OpenAI-compatible upstream (serving `model`) on a fixed port that can go away and come back (a restart)."""

    def __init__(self, model: str = "m") -> None:
        self.model = model
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        async def complete(request: web.Request) -> web.Response:
            return web.json_response(chat_completion(self.model))

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", complete)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def restart_for(self, seconds: float) -> None:
        await self.stop()
        await asyncio.sleep(seconds)
        await self.start()


# -- a model server with a fixed number of places (learned concurrency) -------------------------------------------


class Slots:
    """A model server that answers `k` requests at once and queues the rest in arrival order, as Ollama does
    with `OLLAMA_NUM_PARALLEL=k`: an answer streams its first event `prefill` seconds after it gets a place,
    then `words` more events `per_word` apart (unstreamed: one JSON answer at the end). `k` may change
    while it runs; `most` is the most requests it ever held at once (served and queued)."""

    def __init__(self, k: int, *, model: str = "m1", prefill: float = 0.03, words: int = 8, per_word: float = 0.05):
        self.k = k
        self.model = model
        self.prefill = prefill
        self.words = words
        self.per_word = per_word
        self.serving = 0
        self.held = 0
        self.most = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    def __repr__(self) -> str:
        return f"<Slots k={self.k} serving={self.serving} queued={len(self._queue)} most={self.most}>"

    async def _place(self) -> None:
        if self.serving < self.k and not self._queue:
            self.serving += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter  # the place was handed over: `serving` already counts it
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
                return  # the place goes to the next in line
        self.serving -= 1

    def behavior(self) -> Behavior:
        async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
            self.held += 1
            self.most = max(self.most, self.held)
            try:
                await self._place()
                try:
                    return await self._answer(request, recorded)
                finally:
                    self._release()
            finally:
                self.held -= 1

        return behave

    async def _answer(self, request: web.Request, recorded: Recorded) -> web.StreamResponse:
        stream = isinstance(recorded.json, dict) and recorded.json.get("stream") is True
        await asyncio.sleep(self.prefill)
        if not stream:
            await asyncio.sleep(self.per_word * self.words)
            return web.json_response(chat_completion(self.model, usage=(5, self.words)))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, chunk in enumerate(chat_chunks(self.model, ["w"] * self.words)):
            if index > 1:
                await asyncio.sleep(self.per_word)
            await response.write(sse_event(chunk))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
