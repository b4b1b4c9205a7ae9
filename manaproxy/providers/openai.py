"""Passthrough to any OpenAI-compatible server (Ollama, Groq, OpenRouter, Together, vLLM, llama.cpp ...).

The request body goes upstream with only `model` replaced; the answer comes back as bytes, with only its
`model` rewritten to the resolved target (`sse.ModelRewriter` for streams, `jsonmodel` for a JSON
answer), its usage read and, for streams, the `[DONE]` that makes it complete noted as it passes.

Bounds: an unstreamed answer is read up to `server.max_response_bytes` (decoded), an SSE event up to
`server.max_event_bytes`; past either the attempt fails (`too_large`) and the chain moves on, or, after
the commit point, the stream ends with an error event. An upstream that compresses although we asked for
`identity` is decoded incrementally (`_Decoder`), never more than a slice at a time, so a gzip bomb costs
at most the limit. Timeouts: `connect` bounds the TCP/TLS set-up; for streams, `first_byte` bounds the
wait for the first data event and `idle` every later gap between chunks; `total` bounds the whole
exchange. An unstreamed answer arrives only once the upstream has generated all of it, so its wait is
bounded by `total` alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import aiohttp
import msgspec
import orjson
from yarl import URL

from ..body import RequestBody, SplicedPayload
from ..config import ProviderConfig, ServerSettings
from ..headers import to_client, to_upstream
from ..jsonmodel import HEAD, model_span, replace_model
from ..protocols import (
    CHAT,
    DONE_EVENT,
    RESPONSES,
    StreamProtocol,
    carries_usage,
    error_of,
    has_done,
    usage_from,
    usage_of,
)
from ..redact import Redactor
from ..sse import EventBuffer, ModelRewriter, data_json
from .base import Call, ListedModel, MidStreamFailure, Reply, UpstreamFailure, Usage, translate_errors
from .streamusage import UsageStripper, may_inject

logger = logging.getLogger("manaproxy.providers.openai")  # pinned: deploy/README.md documents it

_ERROR_BODY_LIMIT = 1 << 20  # an error body is read (and decoded) this far at most
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # the end of an SSE event, in any line ending
_DECODE_SLICE = 1 << 20  # decompressed output per step: the event loop gets its turns in between


class _Decoder:
    """Undoes gzip/deflate (should an upstream compress despite `Accept-Encoding: identity`) one slice
    at a time, so that a small chunk that inflates to gigabytes is never inflated whole."""

    __slots__ = ("_inflate",)

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise UpstreamFailure.bad_response(f"unsupported Content-Encoding {encoding[:40]!r}")
        self._inflate = zlib.decompressobj(wbits=47)  # 32 + 15: auto-detect a gzip or zlib header

    @classmethod
    def for_response(cls, resp: aiohttp.ClientResponse) -> _Decoder | None:
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        return None if encoding in ("", "identity") else cls(encoding)

    def slices(self, chunk: bytes) -> Iterator[bytes]:
        """The decoded bytes of `chunk`, in slices of at most `_DECODE_SLICE`, inflated as they are taken."""
        try:
            while chunk:
                piece = self._inflate.decompress(chunk, _DECODE_SLICE)
                if piece:
                    yield piece
                chunk = self._inflate.unconsumed_tail
        except zlib.error:
            raise UpstreamFailure.bad_response("undecodable compressed body") from None


async def _read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body decoded, or `too_large` once it passes `limit` bytes (checked while reading)."""
    decoder = _Decoder.for_response(resp)
    body = bytearray()
    async for chunk in resp.content.iter_any():
        for piece in decoder.slices(chunk) if decoder is not None else (chunk,):
            if len(body) + len(piece) > limit:
                raise UpstreamFailure.too_large(f"upstream answer larger than {limit} bytes")
            body += piece
            if decoder is not None:
                await asyncio.sleep(0)  # inflating is the one step here that could hold the loop
    return bytes(body)


async def _read_error_body(resp: aiohttp.ClientResponse) -> bytes:
    """At most the first `_ERROR_BODY_LIMIT` bytes of an error body, decoded."""
    try:
        return await _read_body(resp, _ERROR_BODY_LIMIT)
    except UpstreamFailure as failure:
        if failure.reason != "too_large":
            raise
        return b""  # an error body that large says nothing a client could use


def _largest_event(events: bytes) -> int:
    """The size of the largest of the complete SSE `events`."""
    largest = start = 0
    for boundary in _BOUNDARY.finditer(events):
        largest = max(largest, boundary.end() - start)
        start = boundary.end()
    return largest


class OpenAIStream:
    """An upstream SSE stream past its first data event, relayed with `model` rewritten.

    Per chunk: two substring checks (`[DONE]`, usage) and the `model` splice; nothing is parsed unless a
    usage chunk goes by.
    """

    __slots__ = (
        "_buffer",
        "_decoder",
        "_idle",
        "_max_event",
        "_protocol",
        "_redactor",
        "_resp",
        "_rest",
        "_rewriter",
        "_stripper",
        "complete",
        "first",
        "headers",
        "status",
        "usage",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        first: bytes,
        rest: bytes,
        buffer: EventBuffer,
        decoder: _Decoder | None,
        rewriter: ModelRewriter,
        *,
        protocol: StreamProtocol,
        idle: float,
        max_event: int,
        redactor: Redactor,
        strip_usage: bool = False,
    ) -> None:
        self.status = resp.status
        # The stream's own Content-Type goes too, parameters (`; charset=utf-8`) and all, as a direct call has it.
        stream_type = ("Content-Type", resp.headers.get("Content-Type", "text/event-stream"))
        self.headers = redactor.pairs([*to_client(resp.headers), stream_type])
        self._protocol = protocol
        self._redactor = redactor
        self.complete = protocol.ended_by(first)
        self.usage: Usage | None = usage_of(first)
        # We asked for usage the client did not: what that adds is taken out again (`streamusage.py`).
        self._stripper = UsageStripper() if strip_usage else None
        self.first = rewriter.rewrite(first if self._stripper is None else self._stripper.strip(first))
        self._resp = resp
        self._buffer = buffer
        self._decoder = decoder
        self._rest = rest
        self._idle = idle
        self._max_event = max_event
        self._rewriter = rewriter

    def _ready(self, events: bytes) -> tuple[bytes, MidStreamFailure | None]:
        """Note what the client-bound `events` complete or count, and rewrite their `model`.

        An upstream error event ends the stream: the events before it are relayed, it is not (it may quote
        our key); the failure returned makes the proxy end the stream with its one error event instead.
        """
        failure = None
        if len(events) > self._max_event:  # only then can one of them be past the bound: a whole one in one read
            events, failure = self._until_too_large(events)
        if b'"error"' in events:  # the cheap check; the events are cut and read only when it passes
            events, error = self._until_error(events)
            failure = error or failure  # an error event before the oversized one ends the stream first
        if not self.complete and self._protocol.ended_by(events):
            self.complete = True
        if carries_usage(events):
            self.usage = usage_of(events) or self.usage
        if self._stripper is not None:
            events = self._stripper.strip(events)
        return self._rewriter.rewrite(events), failure

    def _until_too_large(self, events: bytes) -> tuple[bytes, MidStreamFailure | None]:
        """`events` up to the first event larger than `max_event_bytes`, and that event as a failure."""
        start = 0
        for boundary in _BOUNDARY.finditer(events):
            if boundary.end() - start > self._max_event:
                return events[:start], MidStreamFailure(
                    "upstream_error", f"upstream event larger than {self._max_event} bytes"
                )
            start = boundary.end()
        return events, None

    def _until_error(self, events: bytes) -> tuple[bytes, MidStreamFailure | None]:
        """`events` up to the first upstream error event, and that event as a failure (its message redacted)."""
        start = 0
        for boundary in _BOUNDARY.finditer(events):
            event = events[start : boundary.end()]
            error = error_of(event)
            if error is None and self._protocol is RESPONSES and b'"type"' in event:
                data = data_json(event)  # the Responses API's own `error` event: {"type": "error", "message" ...}
                error = data if isinstance(data, dict) and data.get("type") == "error" else None
            if error is not None:
                message = self._redactor.line(str(error.get("message", "error event")), limit=120)
                return events[:start], MidStreamFailure("upstream_error", f"upstream sent an error event: {message}")
            start = boundary.end()
        return events, None

    async def events(self) -> AsyncGenerator[bytes, None]:
        if self._rest:
            ready, failure = self._ready(self._rest)
            if ready:
                yield ready
            if failure is not None:
                raise failure
        content = self._resp.content
        buffer = self._buffer
        decoder = self._decoder
        while True:
            try:
                chunk = await content.readany()
            except aiohttp.SocketTimeoutError:  # sock_read, armed with `idle` at the commit (see below)
                raise MidStreamFailure("idle_timeout", f"no data from upstream for {self._idle:g}s") from None
            except TimeoutError:
                raise MidStreamFailure("upstream_error", "upstream exceeded its total timeout") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise MidStreamFailure(
                    "upstream_error", f"upstream connection failed mid-stream ({type(exc).__name__})"
                ) from None
            if not chunk:
                # Tolerate a final `data: [DONE]` without its blank line (what follows it is past the end);
                # drop any other half event, so that the stream ends without its end and gets an error event.
                first_line = buffer.pending.lstrip().split(b"\n", 1)[0].strip()
                if first_line and has_done(first_line):
                    yield self._ready(DONE_EVENT)[0]
                if self._protocol.ends_with_body:
                    self.complete = True
                return
            try:
                for piece in decoder.slices(chunk) if decoder is not None else (chunk,):
                    released = buffer.feed(piece)
                    if released:
                        ready, failure = self._ready(released)
                        if ready:
                            yield ready
                        if failure is not None:
                            raise failure
                    elif buffer.pending_size > self._max_event:
                        raise MidStreamFailure("upstream_error", f"upstream event larger than {self._max_event} bytes")
            except UpstreamFailure as failure:  # undecodable gzip
                raise MidStreamFailure("upstream_error", failure.detail) from None

    def close(self, *, reuse: bool) -> None:
        if reuse:
            self._resp.release()
        else:
            self._resp.close()


def _names_stream_options(failure: UpstreamFailure) -> bool:
    """An upstream's 400 about the `stream_options` we added (a server that does not know the field)."""
    return failure.status == 400 and b"stream_options" in (failure.body or b"")


class OpenAIProvider:
    """Provider of kind `openai`."""

    def __init__(
        self,
        config: ProviderConfig,
        session: aiohttp.ClientSession,
        redactor: Redactor | None = None,
        server: ServerSettings | None = None,
    ) -> None:
        self.config = config
        # Whatever the upstream says in an error goes through it before anyone sees it.
        self._redactor = redactor if redactor is not None else Redactor([config])
        self._server = server if server is not None else ServerSettings()
        self._session = session
        # The upstream answered 400 naming `stream_options` to a request we added it to: not again until a
        # reload (which builds a new provider object).
        self._no_stream_options = False
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

    async def aclose(self) -> None:
        """Nothing of its own to release: its connections are pooled in the application's session, and each
        stream releases its own (`OpenAIStream.close`)."""

    async def send(self, call: Call) -> Reply | OpenAIStream:
        inject = self._injects_usage(call)
        body = call.body.with_model(call.target.model, include_usage=inject)
        headers = {
            **to_upstream(call.headers, self.config.forward_headers),
            **self._headers,
            "Content-Type": call.body.content_type,
            "Accept": call.accept or ("text/event-stream" if call.stream else "application/json"),
            "X-Request-ID": call.request_id,
        }
        url = self._url(call.path)
        resolved = str(call.target)
        if call.stream:
            with translate_errors("before the first byte"):
                async with asyncio.timeout(self.config.timeouts.first_byte):
                    try:
                        return await self._open_stream(url, body, headers, resolved, call.protocol, strip_usage=inject)
                    except UpstreamFailure as failure:
                        if not (inject and _names_stream_options(failure)):
                            raise
                    self._no_stream_options = True
                    logger.warning(
                        "provider %s refused stream_options (HTTP 400): streams go to it without usage "
                        "until the next reload (set stream_usage: passthrough to say so)",
                        self.config.name,
                    )
                    body = call.body.with_model(call.target.model)
                    return await self._open_stream(url, body, headers, resolved, call.protocol)
        with translate_errors("waiting for the answer"):
            return await self._exchange(url, body, headers, resolved)

    def _injects_usage(self, call: Call) -> bool:
        """Whether `call` goes upstream asking for usage the client did not ask for (`streamusage.py`)."""
        return (
            call.stream
            and call.protocol is CHAT
            and self.config.stream_usage == "inject"
            and not self._no_stream_options
            and isinstance(call.body, RequestBody)
            and may_inject(call.body.stream_options)
        )

    async def _exchange(self, url: URL, body: bytes | SplicedPayload, headers: dict[str, str], resolved: str) -> Reply:
        async with self._session.post(
            url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
        ) as resp:
            await self._check_status(resp)
            return await self._whole_reply(resp, resolved)

    async def _whole_reply(self, resp: aiohttp.ClientResponse, resolved: str) -> Reply:
        """An unstreamed answer read whole (within `max_response_bytes`), ready for the client."""
        data = await _read_body(resp, self._server.max_response_bytes)
        reply = self._reply(resp.status, data, resp.headers.get("Content-Type") or "application/json", resolved)
        reply.headers = self._redactor.pairs(to_client(resp.headers))
        return reply

    def _reply(self, status: int, body: bytes, content_type: str, resolved: str) -> Reply:
        """The unstreamed answer ready for the client: `model` set to the resolved target, usage read.

        Read with `jsonmodel.HEAD`, which builds only `model`, `usage` and `error`: an answer of many
        megabytes (embeddings) costs one validating pass and the splice, not a decode and an encode.
        """
        if "json" not in content_type and not body.lstrip().startswith(b"{"):
            return Reply(status, body, content_type)  # not JSON (audio, ...): relayed untouched
        try:
            head = HEAD.decode(body)
        except msgspec.ValidationError:  # JSON, but not an object
            return Reply(status, body, content_type)
        except (msgspec.DecodeError, RecursionError):
            raise UpstreamFailure.bad_response("upstream answered 2xx with invalid JSON") from None
        error = orjson.loads(bytes(head.error)) if head.error else None
        if error:
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamFailure.error_event(
                f"upstream answered 2xx with an error: {self._redactor.line(str(message), 120)}"
            )
        usage = usage_from({"usage": orjson.loads(bytes(head.usage))}) if head.usage else None
        model_raw = bytes(head.model)
        if not model_raw:
            return Reply(status, body, content_type, usage)
        span = model_span(body, model_raw)
        if span is None:  # bytes that cannot tell the top-level member from a nested one
            data: Any = orjson.loads(body)
            data["model"] = resolved
            return Reply(status, orjson.dumps(data), content_type, usage)
        return Reply(status, b"".join(replace_model(body, span, orjson.dumps(resolved))), content_type, usage)

    async def _open_stream(
        self,
        url: URL,
        body: bytes | SplicedPayload,
        headers: dict[str, str],
        resolved: str,
        protocol: StreamProtocol,
        *,
        strip_usage: bool = False,
    ) -> Reply | OpenAIStream:
        resp = await self._session.post(url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False)
        try:
            await self._check_status(resp)
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                # Some servers answer a stream request with one JSON document: relay it unstreamed.
                reply = await self._whole_reply(resp, resolved)
                resp.release()
                return reply
            max_event = self._server.max_event_bytes
            decoder = _Decoder.for_response(resp)
            buffer = EventBuffer()
            first = rest = b""
            while not first:
                chunk = await resp.content.readany()
                if not chunk:
                    raise UpstreamFailure.ended_early("upstream ended the stream before its first event")
                for piece in decoder.slices(chunk) if decoder is not None else (chunk,):
                    if first:  # the rest of this chunk comes after the first event
                        rest += buffer.feed(piece)
                        continue
                    first, rest = buffer.first_event(piece)
                    if not first and buffer.pending_size > max_event:
                        raise UpstreamFailure.too_large(f"no complete event in the first {max_event} bytes")
            if len(first) > max_event and _largest_event(first) > max_event:  # one that came whole in one read
                raise UpstreamFailure.too_large(f"upstream event larger than {max_event} bytes")
            error = error_of(first)
            if error is None and protocol is RESPONSES and b'"type"' in first:
                data = data_json(first)  # the Responses API's own `error` event: {"type": "error", "message" ...}
                error = data if isinstance(data, dict) and data.get("type") == "error" else None
            if error is not None:
                message = self._redactor.line(str(error.get("message", "error event")), limit=120)
                raise UpstreamFailure.error_event(f"first event was an error: {message}")
            idle = self.config.timeouts.idle
            reader = resp.connection.protocol if resp.connection is not None else None
            if reader is not None:
                # From here on, gaps between chunks are bounded by aiohttp's own read timer: it is re-armed
                # as bytes arrive and paused while a slow client holds reading back, at no per-chunk cost.
                reader.read_timeout = idle
                reader.start_timeout()
            rewriter = ModelRewriter(resolved)
            return OpenAIStream(
                resp,
                first,
                rest,
                buffer,
                decoder,
                rewriter,
                protocol=protocol,
                idle=idle,
                max_event=max_event,
                redactor=self._redactor,
                strip_usage=strip_usage,
            )
        except BaseException:
            resp.close()
            raise

    async def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        if not 200 <= resp.status <= 599:  # 999, 600: no HTTP answer to relay as such; a lone entry gets a 502
            raise UpstreamFailure.bad_response(f"upstream answered HTTP status {resp.status}", status=502)
        if resp.status >= 300:
            # Redacted here, at the source: the body may be relayed to the client, its text logged and shown.
            # Its headers too: a lone entry's error is relayed with them (`proxy.exhausted`, `_caller_error`).
            data = self._redactor.bytes(await _read_error_body(resp))
            failure = UpstreamFailure.from_status(resp.status, resp.headers, data, resp.headers.get("Content-Type"))
            failure.headers = self._redactor.pairs(failure.headers)
            raise failure

    async def list_models(self, timeout: float) -> list[ListedModel]:
        data = await self._get_json("/models", timeout)
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise UpstreamFailure.bad_response("models list has no 'data' array")
        return [
            (item["id"], item["created"] if type(item.get("created")) is int else None)
            for item in items
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        ]

    async def probe(self, timeout: float) -> None:
        await self._get_json(self.config.probe or "/models", timeout)

    async def _get_json(self, path: str, timeout: float) -> Any:
        with translate_errors("while probing"):
            async with asyncio.timeout(timeout):
                async with self._session.get(self._url(path), headers=self._headers, allow_redirects=False) as resp:
                    await self._check_status(resp)
                    data = await _read_body(resp, self._server.max_response_bytes)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
