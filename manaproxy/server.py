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

Client connections are bounded in number too (`server.max_connections`; by default derived from the
open-files limit, see `default_max_connections`): an idle keep-alive connection needs no key, so without a
cap a client holding enough of them would use up the file descriptors a real request needs (its own and
its upstream's). When a new connection takes the count past the cap, the connection that has been idle
between requests the longest is closed (closing an idle keep-alive connection is ordinary HTTP: clients
reconnect); when none is idle, the new connection is refused: it is accepted, answered an OpenAI-shaped
503 `too_many_connections` with `Retry-After: 1` and `Connection: close` at once (without waiting for a
request that may never come), half-closed, and closed once the client closes or after
`_REFUSED_LINGER_SECONDS`, whatever it sends meanwhile discarded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import resource
from collections.abc import Callable
from time import monotonic
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler
from aiohttp.web_protocol import RequestPayloadError as _PayloadError

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


_REFUSED_RESPONSE = b"".join(
    (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n",
        b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n",
    )
)
# A refused connection is half-closed after its 503 and kept this long at most, so the client reads the
# 503 rather than a reset (closing a socket with unread input sends RST).
_REFUSED_LINGER_SECONDS = 1.0
# Headroom kept out of the open-files limit for what is not a client connection: the listening socket,
# Redis, the log, config reloads, DNS, probes.
_OPEN_FILES_HEADROOM = 128
_MAX_CONNECTIONS_CEILING = 1_000_000


def default_max_connections(open_files: int) -> int:
    """`server.max_connections` when the config sets none: half the open-files limit left after some
    headroom, since a client connection that is streaming holds two files (its socket and the upstream's).
    A 1024 limit gives 448; an unlimited one (`RLIM_INFINITY`, negative here) the ceiling."""
    if open_files < 0 or open_files >= 2 * _MAX_CONNECTIONS_CEILING + _OPEN_FILES_HEADROOM:
        return _MAX_CONNECTIONS_CEILING
    return max(16, (open_files - _OPEN_FILES_HEADROOM) // 2)


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


# A request head with an `Upgrade` header. aiohttp's C parser (llhttp) pauses on one it does not support
# (`h2c`) and never answers that request nor any pipelined after it; its pure-Python parser declines the
# upgrade and reads on. A connection that sends one is parsed in Python from then on.
_UPGRADE_HEADER = re.compile(rb"(?i)\nupgrade[ \t]*:")


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
        self.refused = False  # set by `_Server.connection_made` when the connection is over the cap
        self._parser_settings = {
            key: kwargs[key] for key in ("max_line_size", "max_field_size", "max_headers") if key in kwargs
        }
        self._read_size = kwargs.get("read_bufsize", 2**16)
        self._pure_parser = False

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
        super().connection_made(transport)  # calls `_Server.connection_made`, which may refuse us
        if self.refused:
            self._refuse()
        else:
            self._arm_header_deadline()

    @property
    def idle_keepalive(self) -> bool:
        """Kept alive after an answer and waiting for the next request, no byte of it received yet."""
        return (
            self.transport is not None
            and self._request_count > 0
            and self._header_deadline is None
            and self._waiting_for_request()
            and not self._force_close
        )

    @property
    def idle_since(self) -> float:
        # aiohttp's keep-alive close time: set when the last answer was written, plus a constant.
        return self._next_keepalive_close_time

    def _refuse(self) -> None:
        transport = self.transport
        assert transport is not None
        error = ProxyError(503, "too many open connections; retry shortly", code="too_many_connections")
        body = error_body(error.message, status=503, code=error.code)
        transport.write(_REFUSED_RESPONSE % len(body) + body)
        if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
            transport.write_eof()
        self._header_deadline = self._loop.call_later(_REFUSED_LINGER_SECONDS, self.force_close)

    def eof_received(self) -> None:
        if self.refused:
            self.force_close()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped: the connection was answered 503 and is closing
        if self._header_deadline is None and self._waiting_for_request():
            self._arm_header_deadline()  # the first bytes of the next request on a kept-alive connection
        if not self._pure_parser and self._waiting_for_request() and _UPGRADE_HEADER.search(data):
            self._parse_in_python()
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

    def _parse_in_python(self) -> None:
        """Parse this connection's requests with aiohttp's pure-Python parser (see `_UPGRADE_HEADER`)."""
        self._pure_parser = True
        self._parser = HttpRequestParserPy(
            self,
            self._loop,
            self._read_size,
            payload_exception=_PayloadError,
            auto_decompress=True,
            max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
            **self._parser_settings,
        )

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
        answer = error.response()
        response = _Unsigned(status=answer.status, body=answer.body, headers=answer.headers)
        response.force_close()
        return response


class _Unsigned(web.Response):
    """A response that names no server software. The app's answers lose aiohttp's `Server` default in an
    `on_response_prepare` hook (`app.say_nothing_of_us`); one answered before any app sees the request (a
    malformed one) has no hook, so it drops the header once aiohttp has set it."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)


class _Server(web.Server):
    """aiohttp's server with our protocol class and the connection cap (see the module docstring)."""

    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self._last_refusal_logged = -math.inf

    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:
            return
        # Closed connections stay listed until their task ends: count only the open ones.
        handlers = [each for each in self._connections if isinstance(each, _RequestHandler) and each is not handler]
        open_now = 1 + sum(1 for each in handlers if each.transport is not None)
        if open_now <= self.max_connections:
            return
        idle = [each for each in handlers if each.idle_keepalive]
        if idle:
            min(idle, key=lambda each: each.idle_since).force_close()
            return
        assert isinstance(handler, _RequestHandler)
        handler.refused = True
        now = self._loop.time()
        if now - self._last_refusal_logged >= _REFUSAL_LOG_INTERVAL:  # one line per interval, not per flood
            self._last_refusal_logged = now
            logger.warning(
                "%d client connections open, none idle (server.max_connections %d): refusing new ones with 503",
                open_now - 1,
                self.max_connections,
            )


_STRAGGLER_SECONDS = 2.0
_REFUSAL_LOG_INTERVAL = 10.0


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections use `_RequestHandler`.

    Defaults that every manaproxy server needs: `handler_cancellation` (a client that disconnects
    cancels its handler, so the upstream connection is closed at once), no aiohttp access log (the
    request log line is ours), the config's keep-alive and header timeouts, and its connection cap
    (`max_connections`: the setting, or derived from the open-files limit as it is now).
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
        self.max_connections = server.max_connections or default_max_connections(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        )
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no setting for the protocol class: the same server, built with ours.
        return _Server(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            max_connections=self.max_connections,
            **server._kwargs,
        )
