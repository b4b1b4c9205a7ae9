"""Passthrough to any OpenAI-compatible server (Ollama, Groq, OpenRouter, Together, vLLM, llama.cpp ...).

The request body goes upstream with only `model` replaced; the answer comes back as bytes, with only its
`model` rewritten to the resolved target (`sse.ModelRewriter`), its usage read and, for streams, the
`[DONE]` that makes it complete noted as it passes. Timeouts:
`connect` bounds the TCP/TLS set-up; for streams, `first_byte` bounds the wait for the first data event
and `idle` every later gap between chunks; `total` bounds the whole exchange. An unstreamed answer
arrives only once the upstream has generated all of it, so its wait is bounded by `total` alone.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from ..body import SplicedPayload
from ..config import ProviderConfig
from ..redact import Redactor
from ..sse import EventBuffer, ModelRewriter, error_of, has_done, usage_from, usage_of
from .base import Call, MidStreamFailure, Reply, UpstreamFailure, Usage, translate_errors

_ERROR_BODY_LIMIT = 1 << 20
# An SSE event bigger than this is no chat chunk: the upstream is broken (or never sends a blank line).
_MAX_EVENT_BYTES = 8 << 20


async def _read_body(resp: aiohttp.ClientResponse, limit: int | None = None) -> bytes:
    """The whole body (or its first `limit` bytes), decoded should it be compressed after all."""
    if limit is None:
        data = await resp.read()
    else:  # `content.read(n)` alone returns only what has arrived so far
        buffer = bytearray()
        while len(buffer) < limit:
            piece = await resp.content.read(limit - len(buffer))
            if not piece:
                break
            buffer += piece
        data = bytes(buffer)
    return _decode_body(data, resp.headers.get("Content-Encoding", ""))


def _decode_body(body: bytes, encoding: str) -> bytes:
    """Undo gzip/deflate should an upstream compress despite `Accept-Encoding: identity`."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            return zlib.decompress(body, wbits=47)  # 32 + 15: auto-detect gzip or zlib header
        except zlib.error:
            raise UpstreamFailure("bad_response", "undecodable compressed body") from None
    raise UpstreamFailure("bad_response", f"unsupported Content-Encoding {encoding!r}")


class OpenAIStream:
    """An upstream SSE stream past its first data event, relayed with `model` rewritten.

    Per chunk: two substring checks (`[DONE]`, usage) and the `model` splice; nothing is parsed unless a
    usage chunk goes by.
    """

    __slots__ = ("_buffer", "_idle", "_resp", "_rest", "_rewriter", "complete", "first", "status", "usage")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        first: bytes,
        rest: bytes,
        buffer: EventBuffer,
        idle: float,
        rewriter: ModelRewriter,
    ) -> None:
        self.status = resp.status
        self.complete = has_done(first)
        self.usage: Usage | None = usage_of(first)
        self.first = rewriter.rewrite(first)
        self._resp = resp
        self._buffer = buffer
        self._rest = rest
        self._idle = idle
        self._rewriter = rewriter

    def _ready(self, events: bytes) -> bytes:
        """Note what the client-bound `events` complete or count, and rewrite their `model`."""
        if not self.complete and has_done(events):
            self.complete = True
        if b'"prompt_tokens"' in events:
            self.usage = usage_of(events) or self.usage
        return self._rewriter.rewrite(events)

    async def events(self) -> AsyncGenerator[bytes, None]:
        if self._rest:
            yield self._ready(self._rest)
        content = self._resp.content
        buffer = self._buffer
        idle = self._idle
        while True:
            try:
                chunk = await content.readany()
            except aiohttp.SocketTimeoutError:  # sock_read, armed with `idle` at the commit (see below)
                raise MidStreamFailure("idle_timeout", f"no data from upstream for {idle:g}s") from None
            except TimeoutError:
                raise MidStreamFailure("upstream_error", "upstream exceeded its total timeout") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise MidStreamFailure(
                    "upstream_error", f"upstream connection failed mid-stream ({type(exc).__name__})"
                ) from None
            if not chunk:
                tail = buffer.pending.strip()
                # Tolerate a final `data: [DONE]` without its blank line; drop any other half event.
                if tail and has_done(tail):
                    yield self._ready(tail + b"\n\n")
                return
            released = buffer.feed(chunk)
            if released:
                yield self._ready(released)
            elif len(buffer.pending) > _MAX_EVENT_BYTES:
                raise MidStreamFailure("upstream_error", f"upstream event larger than {_MAX_EVENT_BYTES} bytes")

    def close(self, *, reuse: bool) -> None:
        if reuse:
            self._resp.release()
        else:
            self._resp.close()


class OpenAIProvider:
    """Provider of kind `openai`."""

    def __init__(
        self, config: ProviderConfig, session: aiohttp.ClientSession, redactor: Redactor | None = None
    ) -> None:
        self.config = config
        # Whatever the upstream says in an error goes through it before anyone sees it.
        self._redactor = redactor if redactor is not None else Redactor([config])
        self._session = session
        headers = {"Accept-Encoding": "identity", **config.headers}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers
        t = config.timeouts
        self._timeout = aiohttp.ClientTimeout(total=t.total, connect=t.connect, sock_connect=t.connect)
        # Encoded once; request paths (already checked by `paths.upstream_path`) are appended verbatim.
        self._base = str(URL(config.base_url))

    def _url(self, path: str) -> URL:
        """`base_url` + `path` as sent: `encoded=True`, so the client library resolves no dot segment."""
        return URL(self._base + path, encoded=True)

    def __repr__(self) -> str:
        return f"<OpenAIProvider {self.config.name} {self.config.base_url}>"

    async def send(self, call: Call) -> Reply | OpenAIStream:
        body = call.body.with_model(call.target.model)
        headers = {
            **self._headers,
            "Content-Type": "application/json",
            "Accept": call.accept or ("text/event-stream" if call.stream else "application/json"),
            "X-Request-ID": call.request_id,
        }
        url = self._url(call.path)
        resolved = str(call.target)
        if call.stream:
            with translate_errors("before the first byte"):
                async with asyncio.timeout(self.config.timeouts.first_byte):
                    return await self._open_stream(url, body, headers, resolved)
        with translate_errors("waiting for the answer"):
            return await self._exchange(url, body, headers, resolved)

    async def _exchange(self, url: URL, body: bytes | SplicedPayload, headers: dict[str, str], resolved: str) -> Reply:
        async with self._session.post(
            url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
        ) as resp:
            data = await _read_body(resp)
            self._check_status(resp, data)
            return self._reply(resp.status, data, resp.headers.get("Content-Type", "application/json"), resolved)

    def _reply(self, status: int, body: bytes, content_type: str, resolved: str) -> Reply:
        """The unstreamed answer ready for the client: `model` set to the resolved target, usage read."""
        if "json" not in content_type and not body.lstrip().startswith(b"{"):
            return Reply(status, body, content_type)  # not JSON (audio, ...): relayed untouched
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamFailure("bad_response", "upstream answered 2xx with invalid JSON") from None
        if not isinstance(data, dict):
            return Reply(status, body, content_type)
        if data.get("error"):
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamFailure(
                "error_event", f"upstream answered 2xx with an error: {self._redactor.line(str(message), 120)}"
            )
        if "model" in data:
            data["model"] = resolved
            body = orjson.dumps(data)
        return Reply(status, body, content_type, usage_from(data))

    async def _open_stream(
        self, url: URL, body: bytes | SplicedPayload, headers: dict[str, str], resolved: str
    ) -> Reply | OpenAIStream:
        resp = await self._session.post(url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False)
        try:
            if resp.status >= 300:
                self._check_status(resp, await _read_body(resp, _ERROR_BODY_LIMIT))
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                # Some servers answer a stream request with one JSON document: relay it unstreamed.
                data = await _read_body(resp)
                resp.release()
                return self._reply(resp.status, data, content_type or "application/json", resolved)
            buffer = EventBuffer()
            while True:
                chunk = await resp.content.readany()
                if not chunk:
                    raise UpstreamFailure("closed", "upstream ended the stream before its first event")
                first, rest = buffer.first_event(chunk)
                if first:
                    break
                if len(buffer.pending) > _MAX_EVENT_BYTES:
                    raise UpstreamFailure("bad_response", f"no complete event in the first {_MAX_EVENT_BYTES} bytes")
            error = error_of(first)
            if error is not None:
                message = self._redactor.line(str(error.get("message", "error event")), limit=120)
                raise UpstreamFailure("error_event", f"first event was an error: {message}")
            idle = self.config.timeouts.idle
            protocol = resp.connection.protocol if resp.connection is not None else None
            if protocol is not None:
                # From here on, gaps between chunks are bounded by aiohttp's own read timer: it is re-armed
                # as bytes arrive and paused while a slow client holds reading back, at no per-chunk cost.
                protocol.read_timeout = idle
                protocol.start_timeout()
            return OpenAIStream(resp, first, rest, buffer, idle, ModelRewriter(resolved))
        except BaseException:
            resp.close()
            raise

    def _check_status(self, resp: aiohttp.ClientResponse, data: bytes) -> None:
        if resp.status >= 300:
            # Redacted here, at the source: the body may be relayed to the client, its text logged and shown.
            data = self._redactor.bytes(data)
            raise UpstreamFailure.from_status(resp.status, resp.headers, data, resp.headers.get("Content-Type"))

    async def list_models(self, timeout: float) -> list[str]:
        data = await self._get_json("/models", timeout)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise UpstreamFailure("bad_response", "models list has no 'data' array")
        return [item["id"] for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]

    async def probe(self, timeout: float) -> None:
        await self._get_json(self.config.probe or "/models", timeout)

    async def _get_json(self, path: str, timeout: float) -> Any:
        with translate_errors("while probing"):
            async with asyncio.timeout(timeout):
                async with self._session.get(self._url(path), headers=self._headers, allow_redirects=False) as resp:
                    data = await _read_body(resp)
                    self._check_status(resp, data)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
