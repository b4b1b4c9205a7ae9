"""CORS for browser clients: preflight answers and the `Access-Control-*` headers of allowed origins.

Origins come from `CORS_ORIGINS` (comma-separated, `*` for any); none by default, and then browsers
refuse cross-origin calls as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .errors import ProxyError

# Response headers a browser app may read. Each named: with credentials, CORS takes no wildcard.
EXPOSED = ", ".join(
    (
        "X-Request-ID",
        "X-Upstream-Request-ID",
        "X-Mana-LLM-Resolved",
        "X-Mana-LLM-Attempts",
        "Retry-After",
        "retry-after-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
    )
)


def _allowed(origin: str, origins: frozenset[str]) -> bool:
    return origin in origins or "*" in origins


def cors_middleware(origins: frozenset[str]) -> Middleware:
    """Answer preflight requests: 204 for an allowed origin, an OpenAI-shaped 403 for any other."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if _allowed(request.headers.get("Origin", ""), origins):
                return web.Response(
                    status=204,
                    headers={
                        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                        "Access-Control-Allow-Headers": request.headers.get(
                            "Access-Control-Request-Headers", "Authorization, Content-Type"
                        ),
                        "Access-Control-Max-Age": "600",
                    },
                )
            return ProxyError(403, "origin not allowed", code="cors_origin_not_allowed").response()
        return await handler(request)

    return preflight


def cors_headers(origins: frozenset[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """`on_response_prepare`: allow an allowed origin to read the response and our headers."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and _allowed(origin, origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers.add("Vary", "Origin")

    return add_headers
