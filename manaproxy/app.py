"""`create_app(config, ...)` → the aiohttp application: every route, every middleware, every long-lived resource.

Dependencies are injected (`session`, `registry`) so tests pass their own. App state is set once, before
startup, under typed `AppKey`s; a reload swaps `Gateway.runtime`, never an app key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from aiohttp.resolver import AsyncResolver
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from . import probe, proxy, sharedhealth
from .auth import auth_middleware
from .cache import cache_header
from .clients import parse_env_clients
from .config import Config
from .cors import cors_headers, cors_middleware
from .errors import error_middleware
from .gateway import GATEWAY, Gateway
from .limits import ratelimit_headers
from .metrics import instrument
from .readtimer import lazy_read_timeouts
from .reload import RELOADER, Reloader
from .reqlog import log_request
from .requestid import echo_request_id, request_id_middleware
from .views import catalog, events, failures, status
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
    `api_keys`: the entries of `MANAPROXY_API_KEYS` (`name:key` or bare keys); with none, and no `clients:` in
    the config, auth is off (`ConfigError` for a client declared in both places). `registry`: a prometheus `CollectorRegistry`
    for `/metrics` (None: a fresh one with the process metrics). `probes`: run the active health probes.
    """
    env_clients = parse_env_clients([key.decode("utf-8", "surrogateescape") for key in api_keys])
    gateway = Gateway.for_config(config, env_clients)
    reloader = Reloader(gateway)
    metrics = instrument(gateway, reloader, registry)
    gateway.observers.append(log_request)
    recent_failures = failures.RecentFailures()
    gateway.observers.append(recent_failures.observe)
    event_hub = events.EventHub()
    events.connect(event_hub, gateway, reloader, recent_failures)

    origins = frozenset(cors_origins)
    middlewares: list[Middleware] = [metrics.middleware, request_id_middleware, error_middleware]
    if origins:
        middlewares.append(cors_middleware(origins))
    middlewares.append(auth_middleware(lambda: gateway.runtime.clients))  # off while no client is declared

    # The proxy enforces its own (reloadable) body limit while streaming the body in.
    app = web.Application(middlewares=middlewares, client_max_size=2**62)
    app[GATEWAY] = gateway
    app[RELOADER] = reloader
    app[catalog.MODELS_CACHE] = catalog.ModelsCache()
    app[failures.RECENT_FAILURES] = recent_failures
    app[events.EVENTS] = event_hub
    app[health_views.STARTED_UNIX] = time.time()
    app.on_shutdown.append(event_hub.close)  # open streams must not hold the drain
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(say_nothing_of_us)
    app.on_response_prepare.append(ratelimit_headers)
    app.on_response_prepare.append(cache_header)
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

    async def shared_redis(app: web.Application) -> AsyncIterator[None]:
        # The one Redis connection (when `redis.url` is set): opened once, closed once after the last store.
        gateway.redis.open(gateway.config.redis)
        yield
        await gateway.cache.settle()
        await gateway.limiter.settle()  # the last answers' tokens, counted before the link closes
        await gateway.redis.close()

    app.cleanup_ctx.append(shared_redis)
    app.cleanup_ctx.append(upstream_session)
    if config.health.shared:  # breaker news through the Redis link (sharedhealth.py), read at startup
        metrics.add_collector(sharedhealth.install(app))  # with workers: through the metric files
    if probes:
        app.cleanup_ctx.append(probe.probe_loop)
    app.cleanup_ctx.append(metrics.sharing)  # with workers only (hostmetrics.py)

    app.router.add_get("/health", health_views.liveness)
    app.router.add_get("/v1/health", health_views.health_detail)
    app.router.add_get("/metrics", metrics.view)
    app.router.add_get("/v1/models", catalog.list_models)
    app.router.add_get("/v1/models/{model:.+}", catalog.get_model)
    app.router.add_get("/v1/aliases", catalog.list_aliases)
    app.router.add_get("/v1/failures", failures.list_failures)
    app.router.add_get("/v1/events", events.event_stream)
    app.router.add_get("/status", status.page_handler())
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/{path:.+}"):
        app.router.add_post(path, proxy.forward, expect_handler=_expect_later)
    app.router.add_route("*", "/v1/{path:.+}", proxy.other_method, expect_handler=_expect_later)
    return app
