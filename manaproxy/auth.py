"""Client authentication: `Authorization: Bearer <key>` (what the OpenAI SDKs send) or `X-API-Key`; a
request is let in when any credential it offers is valid.

Keys come from `MANAPROXY_API_KEYS`; when it is unset, auth is off (and startup warns). Every key is
compared in constant time, and all of them are always compared, so timing reveals nothing.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import logfmt
from .errors import ProxyError
from .requestid import REQUEST_ID

logger = logging.getLogger(__name__)

# Which configured key let a request in, as `key#<index>` (never the key): the client, for fair shares.
CLIENT = web.RequestKey("client", str)

# Liveness and scraping stay open: load balancers and Prometheus carry no client key. So does the status
# page: it holds no data, and its script sends the key it asks for with each request for data.
OPEN_PATHS = frozenset({"/health", "/metrics", "/status"})


def parse_keys(value: str | None) -> tuple[bytes, ...]:
    """Comma-separated keys from the environment; blanks ignored."""
    if not value:
        return ()
    return tuple(key.strip().encode() for key in value.split(",") if key.strip())


def presented_keys(request: web.Request) -> list[bytes]:
    """Every credential the request offers: a Bearer token and an `X-API-Key` (the SDKs always send a
    Bearer, so a key in `X-API-Key` comes beside one that may be meant for someone else)."""
    keys = []
    header = request.headers.get("Authorization")
    if header:
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            keys.append(credentials.strip().encode("utf-8", "surrogateescape"))
    api_key = request.headers.get("X-API-Key")
    if api_key and api_key.strip():
        keys.append(api_key.strip().encode("utf-8", "surrogateescape"))
    return keys


def key_matches(presented: bytes, keys: Iterable[bytes]) -> bool:
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    return matched


def _key_name(presented: list[bytes], keys: tuple[bytes, ...]) -> str:
    """`key#<i>` for the first configured key among `presented`, every pair compared (constant time)."""
    found = -1
    for index, key in enumerate(keys):
        matched = False
        for offered in presented:
            matched |= hmac.compare_digest(offered, key)
        if matched and found < 0:
            found = index
    return f"key#{found}"


def auth_middleware(keys: tuple[bytes, ...]) -> Middleware:
    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return await handler(request)
        presented = presented_keys(request)
        if not presented:
            message, code = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'", "missing_api_key"
        elif not any([key_matches(key, keys) for key in presented]):  # a list: every key is compared
            message, code = "invalid API key", "invalid_api_key"
        else:
            request[CLIENT] = _key_name(presented, keys)
            return await handler(request)
        # One line, so rejected clients show up in the journal; never the presented key itself, and the
        # path escaped: it is the client's (`/v1/health%0a<2>FORGED` must not start a line of its own).
        logger.info(
            "request %s: %s %s rejected (%s) from %s",
            request.get(REQUEST_ID, "-"),
            logfmt.value(request.method),
            logfmt.value(request.path[:200]),
            code,
            request.remote,
        )
        raise ProxyError(401, message, code=code)

    return check_key
