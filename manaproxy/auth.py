"""Client authentication: `Authorization: Bearer <key>` (what the OpenAI SDKs send) or `X-API-Key`; a
request is let in when any credential it offers is a client's key, and is that client from then on.

The clients are the current runtime's `ClientTable` (`MANAPROXY_API_KEYS` and the config's `clients:`), read
per request, so a reload adds, removes and rotates keys for the next request while those in flight keep who
they are. No client declared anywhere: auth is off (startup warns) and every request is `anonymous`. Keys are
found by digest and compared in constant time (`clients.py`), and never logged.

Who a request is gets decided here, once, as an `Identity` (`IDENTITY`): its name for logs and metrics, its
client's allow-list and limits, its share of the body budget and its key in the hedge latency sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import logfmt
from .clients import ClientTable
from .config import ANONYMOUS, ClientSpec
from .errors import ProxyError
from .requestid import REQUEST_ID

logger = logging.getLogger("manaproxy.auth")  # pinned: deploy/README.md documents it

# Liveness and scraping stay open: load balancers and Prometheus carry no client key. So does the status
# page: it holds no data, and its script sends the key it asks for with each request for data.
OPEN_PATHS = frozenset({"/health", "/metrics", "/status"})

_SAMPLE_SALT = os.urandom(16)  # the sample key of a client cannot be matched outside this process


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is (never a key)."""

    name: str  # the client's name; `anonymous` with auth off (a metric label, a log value)
    client: ClientSpec | None  # its allow-list and limits; None with auth off
    share: str  # whose share of the in-flight body budget it draws on: the client, or with auth off its address
    # Its key in the `hedge_after: auto` latency sample (a salted hash of the name); None with auth off, where
    # anyone may send anything and no identity can be trusted to be one client.
    sample_key: bytes | None = None

    @classmethod
    def of_client(cls, client: ClientSpec) -> Identity:
        sample_key = hashlib.blake2b(client.name.encode(), digest_size=16, key=_SAMPLE_SALT).digest()
        return cls(client.name, client, client.name, sample_key)

    @classmethod
    def anonymous(cls, request: web.Request) -> Identity:
        return cls(ANONYMOUS, None, request.remote or "-")


IDENTITY = web.RequestKey("identity", Identity)
# The client's name, for what only needs who it is (the same as `IDENTITY.name`; set only with auth on).
CLIENT = web.RequestKey("client", str)


def identity_of(request: web.Request) -> Identity:
    """The request's identity; one with auth off for a request the middleware did not see (an open path)."""
    identity = request.get(IDENTITY)
    return identity if identity is not None else Identity.anonymous(request)


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


def auth_middleware(current: Callable[[], ClientTable]) -> Middleware:
    """The middleware; `current()` is the client table in force (the gateway's runtime's)."""

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        clients = current()
        if not clients.enabled:
            request[IDENTITY] = Identity.anonymous(request)
            return await handler(request)
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return await handler(request)
        presented = presented_keys(request)
        client = clients.identify(presented) if presented else None
        if client is not None:
            request[IDENTITY] = Identity.of_client(client)
            request[CLIENT] = client.name
            return await handler(request)
        if not presented:
            message, code = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'", "missing_api_key"
        else:
            message, code = "invalid API key", "invalid_api_key"
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
