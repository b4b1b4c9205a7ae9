"""The HTTP server under the application: aiohttp's, with our settings and our answer to malformed requests.

`Runner` is what `manaproxy serve` runs and what the tests' proxy fixture runs, so every test exercises
the real server's configuration (handler cancellation, limits, timeouts).

Client connections are bounded in time: a request's headers must be complete within
`server.header_timeout_seconds` of its first byte (of the connection, for the first request) — or the
connection gets a 408 and is closed, so clients trickling header bytes cannot hold connections — and a
connection idle between requests is closed after `server.keepalive_timeout_seconds` (aiohttp's own
keep-alive timer). Both are taken from the config when the server starts.

Answers are bounded while they wait for their client (`HeldAnswers`): a connection whose transport buffer
is above its high-water mark (the client reads nothing, or too little to drain it) is closed after
`server.write_timeout_seconds` without relief, which cancels its handler and so closes its upstream
connection; and all such buffers together stay under `server.max_held_answer_bytes`: a pause that would
pass it closes the connections paused longest (the slowest readers) until they fit. Both read the
current config, so they take effect on reload. Costs nothing per chunk: only pauses are timed.

aiohttp answers a request its HTTP parser rejects (a control byte in a header, an over-long URL, too
many or too large headers, an unsupported `Content-Encoding`) by itself, before any middleware sees it:
a text/plain 400, logged at ERROR with a traceback that quotes the raw header line — a client's
`Authorization` included. `_RequestHandler.handle_error` replaces that with one short WARNING that
names the kind of error and the peer (never a header value), and an OpenAI-shaped error whose status
says what was wrong: 414, 431, 415 or 400.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .config import ServerSettings
from .errors import ProxyError, error_body
from .gateway import GATEWAY

logger = logging.getLogger("manaproxy.server")  # pinned: deploy/README.md documents it


def parser_error(exc: HttpProcessingError) -> ProxyError:
    """The OpenAI-shaped error for a request aiohttp's parser refused; its text quotes nothing sent."""
    if isinstance(exc, LineTooLong):
        # The C parser reports an over-long request line with the bytearray it was building and an
        # over-long header with bytes (pinned by tests/test_malformed_requests.py).
        if isinstance(exc.args[0], bytearray):
            return ProxyError(414, "request URL is too long", code="uri_too_long")
        return ProxyError(431, "a request header is too large", code="header_too_large")
    if isinstance(exc, ContentEncodingError):
        return ProxyError(415, "request Content-Encoding is not supported", code="unsupported_content_encoding")
    if "Too many headers" in str(exc):
        return ProxyError(431, "request has too many headers", code="too_many_headers")
    return ProxyError(400, "malformed HTTP request", code="malformed_request")


_HEADER_TIMEOUT_RESPONSE = b"".join(
    (
        b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n",
        b"Content-Length: %d\r\n\r\n",
    )
)


class HeldAnswers:
    """The connections whose answers wait in their transport buffer (writing paused), oldest pause first."""

    def __init__(self, settings: Callable[[], ServerSettings]) -> None:
        self._settings = settings
        self._paused: dict[_RequestHandler, float] = {}  # handler -> when its writing paused

    def __repr__(self) -> str:
        return f"<HeldAnswers connections={len(self._paused)} held={self.held}>"

    @property
    def held(self) -> int:
        """Answer bytes in the transport buffers of paused connections."""
        return sum(handler.buffered() for handler in self._paused)

    def paused(self, handler: _RequestHandler) -> float:
        """Note `handler`'s pause, close the slowest readers past the budget; the write timeout in seconds."""
        settings = self._settings()
        self._paused[handler] = monotonic()
        held = self.held
        while held > settings.max_held_answer_bytes and self._paused:
            slowest = next(iter(self._paused))
            held -= slowest.buffered()
            slowest.cut("answers held for slow readers passed server.max_held_answer_bytes")
        return settings.write_timeout_seconds

    def resumed(self, handler: _RequestHandler) -> None:
        self._paused.pop(handler, None)


class _RequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with `handle_error` answering parser errors our way, a
    deadline for the headers of each request and one for a client that does not read its answer."""

    def __init__(
        self, *args: Any, header_timeout: float = 10.0, held_answers: HeldAnswers | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._held_answers = held_answers
        self._write_deadline: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._held_answers is not None and self.transport is not None:
            timeout = self._held_answers.paused(self)
            if self.transport is not None and self._write_deadline is None:
                self._write_deadline = self._loop.call_later(timeout, self.cut, f"client read nothing for {timeout:g}s")

    def resume_writing(self) -> None:
        self._writing_done()
        super().resume_writing()

    def _writing_done(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        if self._held_answers is not None:
            self._held_answers.resumed(self)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def cut(self, why: str) -> None:
        """Close the connection now, dropping what its buffer holds; the handler is cancelled with it."""
        self._write_deadline = None
        if self._held_answers is not None:
            self._held_answers.resumed(self)
        if self.transport is not None:
            logger.info("connection from %s closed: %s (%d bytes unsent)", self._peer(), why, self.buffered())
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self._waiting_for_request():
            self._arm_header_deadline()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self._header_deadline is not None and not self._waiting_for_request():
            self._header_deadline.cancel()  # a whole request head arrived
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._writing_done()
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _waiting_for_request(self) -> bool:
        """No request head is complete and none is being handled: what arrives now is a new head."""
        return not self._messages and not self._request_in_progress

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self._loop.call_later(self._header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        transport = self.transport
        if transport is None or not self._waiting_for_request():
            return
        logger.info("request headers from %s did not arrive within %gs: closed", self._peer(), self._header_timeout)
        error = ProxyError(
            408, f"request headers did not arrive within {self._header_timeout:g}s", code="header_timeout"
        )
        body = error_body(error.message, status=408, code=error.code)
        transport.write(_HEADER_TIMEOUT_RESPONSE % len(body) + body)
        self.force_close()
        transport.close()

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "-"

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        error = parser_error(exc)
        # Non-HTTP bytes on the port (TLS, scanners) as the first request are noise, as aiohttp judges too.
        level = logging.DEBUG if isinstance(exc, BadHttpMethod) and self._request_count == 1 else logging.WARNING
        logger.log(level, "malformed request from %s: %s (HTTP %d)", request.remote, error.code, error.status)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the malformed request")
        response = error.response()
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


_STRAGGLER_SECONDS = 2.0


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections use `_RequestHandler`.

    Defaults that every manaproxy server needs: `handler_cancellation` (a client that disconnects
    cancels its handler, so the upstream connection is closed at once), no aiohttp access log (the
    request log line is ours), and the config's keep-alive and header timeouts.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        server = app[GATEWAY].config.server
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("access_log", None)
        # The drain (cli.drain, drain.py) does the waiting; this only bounds a straggler it missed.
        kwargs.setdefault("shutdown_timeout", _STRAGGLER_SECONDS)
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout_seconds)
        kwargs.setdefault("header_timeout", server.header_timeout_seconds)
        gateway = app[GATEWAY]
        self.held_answers = HeldAnswers(lambda: gateway.config.server)
        kwargs.setdefault("held_answers", self.held_answers)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no setting for the protocol class: the same server, built with ours.
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )
