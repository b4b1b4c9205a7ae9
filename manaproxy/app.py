"""`create_app(config, ...)` → the aiohttp application: every route, every middleware, every long-lived resource.

Dependencies are injected (`session`, `registry`) so tests pass their own. App state is set once, before
startup, under typed `AppKey`s; a reload swaps `Gateway.runtime`, never an app key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from aiohttp.resolver import AsyncResolver
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from . import probe, proxy
from .auth import auth_middleware
from .config import Config
from .cors import cors_headers, cors_middleware
from .errors import error_middleware
from .gateway import GATEWAY, Gateway
from .metrics import instrument
from .readtimer import lazy_read_timeouts
from .reload import RELOADER, Reloader
from .reqlog import log_request
from .requestid import echo_request_id, request_id_middleware
from .views import catalog
from .views import health as health_views

logger = logging.getLogger(__name__)


def make_session(*, limit: int = 0) -> aiohttp.ClientSession:
    """The one upstream session: keep-alive pool, aiodns resolver, bodies relayed as received, and no
    cookie jar: a cookie one client's answer set (a CDN's bot cookie ...) is never sent with another's."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, resolver=AsyncResolver(), ttl_dns_cache=300, keepalive_timeout=60
    )
    lazy_read_timeouts(connector)  # a stream's idle bound without a new timer per chunk (readtimer.py)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "manaproxy"},
        raise_for_status=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def say_nothing_of_us(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: no `Server: Python/3.11 aiohttp/…` on any answer — what software and version
    serves is no client's business (and a gift to whoever scans for a vulnerable one)."""
    response.headers.popall("Server", None)


async def _expect_later(request: web.Request) -> None:
    """The `Expect` check of the proxied routes. aiohttp's own sends `100 Continue` before any middleware
    has run (the key check included); ours refuses only what it cannot meet, and `body.read_body` sends
    the `100 Continue` when the request, its key checked, is about to read its body."""
    expect = request.headers.get("Expect", "")
    if request.version == aiohttp.HttpVersion11 and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect[:100]}")


def create_app(
    config: Config,
    *,
    session: aiohttp.ClientSession | None = None,
    api_keys: Sequence[bytes] = (),
    cors_origins: Sequence[str] = (),
    registry: CollectorRegistry | None = None,
    probes: bool = True,
) -> web.Application:
    """Build the application for `config`.

    `session`: the upstream `ClientSession` (one is made, and closed on cleanup, when not given).
    `api_keys`: client keys; empty means auth is off. `registry`: a prometheus `CollectorRegistry`
    for `/metrics` (None: a fresh one with the process metrics). `probes`: run the active health probes.
    """
    gateway = Gateway.for_config(config)
    reloader = Reloader(gateway)
    metrics = instrument(gateway, reloader, registry)
    gateway.observers.append(log_request)

    origins = frozenset(cors_origins)
    middlewares: list[Middleware] = [metrics.middleware, request_id_middleware, error_middleware]
    if origins:
        middlewares.append(cors_middleware(origins))
    if api_keys:
        middlewares.append(auth_middleware(tuple(api_keys)))

    # The proxy enforces its own (reloadable) body limit while streaming the body in.
    app = web.Application(middlewares=middlewares, client_max_size=2**62)
    app[GATEWAY] = gateway
    app[RELOADER] = reloader
    app[catalog.MODELS_CACHE] = catalog.ModelsCache()
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(say_nothing_of_us)
    if origins:
        app.on_response_prepare.append(cors_headers(origins))

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        # Created here, in the running loop, and closed once at cleanup (unless the caller owns it).
        gateway.attach(session or make_session())
        yield
        gateway.flush()  # the records of the last requests: logged and counted before anything closes
        await gateway.aclose()  # what each provider holds of its own, before the session it may pool on
        if session is None and gateway.session is not None:
            await gateway.session.close()

    app.cleanup_ctx.append(upstream_session)
    if probes:
        app.cleanup_ctx.append(probe.probe_loop)
    app.cleanup_ctx.append(metrics.sharing)  # with workers only (hostmetrics.py)

    app.router.add_get("/health", health_views.liveness)
    app.router.add_get("/v1/health", health_views.health_detail)
    app.router.add_get("/metrics", metrics.view)
    app.router.add_get("/v1/models", catalog.list_models)
    app.router.add_get("/v1/models/{model:.+}", catalog.get_model)
    app.router.add_get("/v1/aliases", catalog.list_aliases)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/{path:.+}"):
        app.router.add_post(path, proxy.forward, expect_handler=_expect_later)
    app.router.add_route("*", "/v1/{path:.+}", proxy.other_method, expect_handler=_expect_later)
    return app
