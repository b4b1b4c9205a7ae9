"""The request path: read and parse once, resolve, walk the chain, commit, relay.

The commit point is the first byte sent to the client. Before it, any chain entry may fail and the
next is tried. After it the answer belongs to one provider: an upstream failure ends the stream with an
error event and no `[DONE]`, so a truncated answer never looks complete; the proxy never switches
provider mid-answer. A client that goes away gets its upstream connection closed at once (the server
runs with `handler_cancellation`, so the handler is cancelled even while it waits on the upstream).

Per-request work happens once (parse, resolve, encode the body); per-chunk work is a `bytes.replace` of
the `model` member (sse.ModelRewriter), two substring checks and a write — no logging, no metrics.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from time import perf_counter
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from . import logfmt
from .config import Target
from .errors import JSON_CONTENT_TYPE, ProxyError, bad_request, error_body
from .paths import upstream_path
from .record import CLIENT_DISCONNECTED, COMPLETED, UPSTREAM_ERROR, Attempt, RequestRecord
from .redact import Redactor
from .routing import resolve
from .sse import ModelRewriter, error_event, has_done, usage_from, usage_of
from .state import GATEWAY, REQUEST_ID, Gateway, Runtime
from .upstream import Call, MidStreamFailure, Reply, StreamReply, UpstreamFailure

logger = logging.getLogger(__name__)

RESOLVED_HEADER = "X-Mana-LLM-Resolved"
# Request Content-Encodings aiohttp decodes before the body reaches us (br/zstd only with their libraries).
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})
_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or 413 once it exceeds `limit` bytes (checked before reading when declared)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _DECODED_ENCODINGS:
        # aiohttp decodes the ones it knows (or refuses them, see server.py) and passes others on raw.
        raise ProxyError(415, "request Content-Encoding is not supported", code="unsupported_content_encoding")
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ProxyError(
            413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except RequestPayloadError:  # e.g. `Content-Encoding: gzip` on a body that is not gzip
        raise bad_request("request body could not be decoded", code="invalid_body") from None
    return b"".join(chunks)


def parse_payload(body: bytes) -> dict[str, Any]:
    """Decode the JSON request object and check the fields the proxy itself relies on."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", code="invalid_model", param="model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", code="invalid_stream", param="stream")
    return payload


async def forward(request: web.Request) -> web.StreamResponse:
    """Handler for every forwarded `POST /v1/...` endpoint."""
    gateway = request.app[GATEWAY]
    # One config per request: a reload swaps `gateway.runtime`; this request keeps the one it started with.
    runtime = gateway.runtime
    record = RequestRecord(
        request_id=request[REQUEST_ID],
        endpoint=request.match_info.route.resource.canonical if request.match_info.route.resource else request.path,
        started=perf_counter(),
    )
    try:
        return await _Forwarder(request, gateway, runtime, record).run()
    except ProxyError as err:
        record.status = err.status
        record.error_type = record.error_type or err.code or "error"
        return err.response()
    except Exception:
        record.status = 500
        record.error_type = "internal_error"
        raise
    except asyncio.CancelledError:
        # The client went away (handler cancellation); nothing more can be sent.
        # Not an error of ours nor of the provider's: no error_type, status 499 as nginx logs it.
        if record.outcome is None and record.streaming and record.first_byte is not None:
            record.outcome = CLIENT_DISCONNECTED
        if record.first_byte is None:
            record.status = 499
        raise
    finally:
        record.duration = perf_counter() - record.started
        gateway.observe(record)


class _Forwarder:
    """One request's walk down its chain."""

    __slots__ = ("gateway", "record", "request", "runtime")

    def __init__(self, request: web.Request, gateway: Gateway, runtime: Runtime, record: RequestRecord) -> None:
        self.request = request
        self.gateway = gateway
        self.runtime = runtime
        self.record = record

    async def run(self) -> web.StreamResponse:
        config = self.runtime.config
        record = self.record
        # Checked before anything else: the provider's key goes wherever this path points.
        url = self.request.rel_url
        path = upstream_path(url.raw_path, url.raw_query_string)
        started = perf_counter()
        body = await read_body(self.request, config.server.max_body_bytes)
        record.client_wait += perf_counter() - started
        payload = parse_payload(body)
        record.streaming = payload.get("stream") is True
        model = payload.get("model")
        record.requested = model or ""
        route = resolve(model, config)
        record.alias = route.alias
        if route.alias is None:
            record.requested_provider = route.chain[0].provider

        # Encoded once for every attempt; each provider only splices its own `model` in front.
        try:
            body_without_model = orjson.dumps({key: value for key, value in payload.items() if key != "model"})
        except orjson.JSONEncodeError:  # orjson reads deeper nesting than it writes
            raise bad_request("request body is nested too deeply", code="invalid_json") from None
        accept = self.request.headers.get("Accept")
        for target in route.chain:
            skip = self.gateway.health.skip_reason(config.providers[target.provider])
            if skip is not None:
                record.attempts.append(Attempt(str(target), target.provider, skip, tried=False))
                continue
            call = Call(path, payload, target.model, record.streaming, record.request_id, accept, body_without_model)
            response = await self._try(target, call)
            if response is not None:
                return response
        record.error_type = "all_failed"
        reasons = ", ".join(f"{attempt.target}={attempt.summary}" for attempt in record.attempts)
        raise ProxyError(503, f"no chain entry could answer: {reasons}", code="all_targets_failed")

    async def _try(self, target: Target, call: Call) -> web.StreamResponse | None:
        """Try one target. A response means the request is answered; None means fall back."""
        health = self.gateway.health
        trial = health.acquire(target.provider)
        try:
            return await self._attempt(target, call)
        finally:  # also on cancellation: a client that left must not hold a `max_concurrent` slot
            health.release(target.provider, trial=trial)

    async def _attempt(self, target: Target, call: Call) -> web.StreamResponse | None:
        record = self.record
        started = perf_counter()
        try:
            try:
                reply = await self.runtime.providers[target.provider].send(call)
            finally:
                record.upstream_wait += perf_counter() - started
            if isinstance(reply, Reply):
                body, usage = _rewrite_reply(reply, str(target), self.gateway.redactor)
        except UpstreamFailure as failure:
            return self._failed(target, failure)
        except Exception as exc:
            # A bug in a provider module must not cost the client its answer: log it, try the next entry.
            logger.exception("request %s: provider %s raised", record.request_id, target.provider)
            internal = UpstreamFailure("internal", f"provider error: {type(exc).__name__}", provider_fault=False)
            return self._failed(target, internal)
        if self._tracked(target):
            self.gateway.health.record_success(target.provider, perf_counter() - started)
        record.provider = target.provider
        record.target = str(target)
        record.status = reply.status
        if isinstance(reply, Reply):
            if usage is not None:
                record.prompt_tokens, record.completion_tokens = usage
            headers = {"Content-Type": reply.content_type, RESOLVED_HEADER: str(target)}
            record.first_byte = perf_counter() - record.started
            return web.Response(status=reply.status, body=body, content_type=None, headers=headers)
        return await self._relay(target, reply)

    def _tracked(self, target: Target) -> bool:
        """Whether this request's outcome may feed health: not if a reload has since repointed or
        removed the provider (the new upstream's record starts clean)."""
        return self.gateway.health.is_current(self.runtime.config.providers[target.provider])

    def _failed(self, target: Target, failure: UpstreamFailure) -> web.StreamResponse | None:
        health = self.gateway.health
        record = self.record
        if self._tracked(target):
            if failure.retry_after is not None:
                health.record_rate_limited(target.provider, failure.retry_after, failure.detail)
            elif failure.provider_fault:
                health.record_failure(target.provider, failure.detail)
            elif failure.fallback:
                health.record_neutral(target.provider, failure.detail)
        # A caller error (400, 422 ...) says nothing about the provider: its health record is left alone.
        if failure.fallback:
            record.attempts.append(
                Attempt(str(target), target.provider, failure.reason, failure.detail, status=failure.status)
            )
            return None
        # The caller's request is wrong (400, 413, 422 ...): its error goes back as the upstream sent it.
        record.status = failure.status or 502
        record.error_type = failure.reason
        record.provider = target.provider
        record.target = str(target)
        return _caller_error(failure, target)

    async def _relay(self, target: Target, reply: StreamReply) -> web.StreamResponse:
        """Commit to `target` and relay its stream; a failure from here on ends it with an error event."""
        record = self.record
        response = web.StreamResponse(status=reply.status, headers={**_STREAM_HEADERS, RESOLVED_HEADER: str(target)})
        progress = _Progress()
        try:
            # COMMIT: from here on this answer belongs to `target`.
            await response.prepare(self.request)
            failure: MidStreamFailure | None = None
            provider_fault = True
            try:
                await self._pump(reply, response, progress, ModelRewriter(str(target)))
            except MidStreamFailure as exc:
                failure = exc
            except ConnectionError:
                raise
            except Exception:
                logger.exception("request %s: relaying %s failed", record.request_id, logfmt.value(target))
                failure, provider_fault = MidStreamFailure(UPSTREAM_ERROR, "internal error while relaying"), False
            if progress.done:  # a cut after [DONE] loses nothing
                record.outcome = COMPLETED
            else:
                failure = failure or MidStreamFailure(UPSTREAM_ERROR, "upstream ended the stream without [DONE]")
                self._end_with_error(target, failure, provider_fault=provider_fault)
                message = f"upstream {target} failed mid-stream: {failure.detail}"
                await response.write(error_event(message, code=failure.reason))
            if progress.usage is not None:
                record.prompt_tokens, record.completion_tokens = progress.usage
            await response.write_eof()
        except ConnectionError:
            record.outcome = record.outcome or CLIENT_DISCONNECTED
        finally:
            # Back to the pool only after a clean end; otherwise torn down so the provider stops generating.
            reply.close(complete=progress.clean_end)
        return response

    async def _pump(
        self, reply: StreamReply, response: web.StreamResponse, progress: _Progress, rewriter: ModelRewriter
    ) -> None:
        """Relay events as they arrive. Per chunk: two substring checks, the `model` splice, one write."""
        record = self.record
        first = reply.first
        progress.done = has_done(first)
        progress.usage = usage_of(first)
        await response.write(rewriter.rewrite(first))
        record.first_byte = perf_counter() - record.started
        upstream_wait = client_wait = 0.0
        waiting_since: float | None = perf_counter()  # set while waiting on the upstream
        try:
            async with aclosing(reply.events()) as events:
                async for chunk in events:
                    arrived = perf_counter()
                    upstream_wait += arrived - waiting_since  # type: ignore[operator]
                    waiting_since = None
                    if not progress.done and has_done(chunk):
                        progress.done = True
                    if b'"prompt_tokens"' in chunk:
                        progress.usage = usage_of(chunk) or progress.usage
                    chunk = rewriter.rewrite(chunk)
                    writing = perf_counter()
                    await response.write(chunk)
                    waiting_since = perf_counter()
                    client_wait += waiting_since - writing
            progress.clean_end = True
        finally:
            # The last wait (for the end of the body, or one that failed) is the upstream's too.
            if waiting_since is not None:
                upstream_wait += perf_counter() - waiting_since
            record.upstream_wait += upstream_wait
            record.client_wait += client_wait

    def _end_with_error(self, target: Target, failure: MidStreamFailure, *, provider_fault: bool) -> None:
        self.record.outcome = failure.reason
        self.record.error_type = failure.reason
        if provider_fault and self._tracked(target):
            self.gateway.health.record_failure(target.provider, failure.detail)
        logger.warning(
            "request %s: %s failed after commit: %s",
            self.record.request_id,
            logfmt.value(target),
            logfmt.value(failure.detail),
        )


class _Progress:
    """What the relay has seen of a committed stream."""

    __slots__ = ("clean_end", "done", "usage")

    def __init__(self) -> None:
        self.done = False  # a `data: [DONE]` line went to the client
        self.clean_end = False  # the upstream ended its body normally
        self.usage: tuple[int, int] | None = None


def _rewrite_reply(reply: Reply, resolved: str, redactor: Redactor) -> tuple[bytes, tuple[int, int] | None]:
    """Set `model` to the resolved target in an unstreamed JSON answer; read its usage."""
    body = reply.body
    if "json" not in reply.content_type and not body.lstrip().startswith(b"{"):
        return body, None  # not JSON (audio, ...): relay untouched
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamFailure("bad_response", "upstream answered 2xx with invalid JSON") from None
    if not isinstance(data, dict):
        return body, None
    if data.get("error"):
        message = data["error"].get("message") if isinstance(data["error"], dict) else data["error"]
        raise UpstreamFailure("error_event", f"upstream answered 2xx with an error: {redactor.line(str(message), 120)}")
    if "model" in data:
        data["model"] = resolved
        body = orjson.dumps(data)
    return body, usage_from(data)


def _caller_error(failure: UpstreamFailure, target: Target) -> web.Response:
    """The upstream's own 4xx, relayed; wrapped in the OpenAI shape if it is not already in it."""
    status = failure.status or 502
    body = failure.body or b""
    try:
        data = orjson.loads(body)
        shaped = isinstance(data, dict) and isinstance(data.get("error"), dict)
    except orjson.JSONDecodeError:
        shaped = False
    if not shaped:
        body = error_body(
            f"upstream {target} rejected the request: {failure.detail}", status=status, code=failure.reason
        )
    return web.Response(
        status=status,
        body=body,
        content_type=None,
        headers={
            "Content-Type": JSON_CONTENT_TYPE,
            RESOLVED_HEADER: str(target),
        },
    )
