"""The HTTP server under the application: aiohttp's, with our settings and our answer to malformed requests.

`Runner` is what `manaproxy serve` runs and what the tests' proxy fixture runs, so every test exercises
the real server's configuration (handler cancellation, limits, timeouts).

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
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .errors import ProxyError

logger = logging.getLogger(__name__)


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


class _RequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with `handle_error` answering parser errors our way."""

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


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections use `_RequestHandler`.

    Defaults that every manaproxy server needs: `handler_cancellation` (a client that disconnects
    cancels its handler, so the upstream connection is closed at once) and no aiohttp access log (the
    request log line is ours).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("access_log", None)
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
