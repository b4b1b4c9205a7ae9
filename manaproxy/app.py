"""`create_app(config, ...)` → the aiohttp application: routes, middlewares, long-lived resources.

Dependencies are injected (`session`, `registry`, `clock`) so tests pass their own. App state is set
once, before startup, under typed `AppKey`s; a reload swaps `Gateway.runtime`, never an app key.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from aiohttp.resolver import AsyncResolver
from aiohttp.typedefs import Handler, Middleware

from . import catalog, proxy
from .auth import auth_middleware
from .config import Config
from .errors import ProxyError
from .health import HealthTracker
from .health import views as health_views
from .redact import Redactor
from .state import GATEWAY, REQUEST_ID, Gateway, build_runtime

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_CORS_ORIGINS = web.AppKey("cors_origins", frozenset)


def make_session(*, limit: int = 0) -> aiohttp.ClientSession:
    """The one upstream session: keep-alive pool, aiodns resolver, bodies relayed as received."""
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, resolver=AsyncResolver(), ttl_dns_cache=300, keepalive_timeout=60
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
        skip_auto_headers=("User-Agent",),
        headers={"User-Agent": "manaproxy"},
        raise_for_status=False,
    )


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the client's X-Request-ID if it is sane, else make one; `on_response_prepare` echoes it."""
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    request[REQUEST_ID] = supplied if _REQUEST_ID_RE.match(supplied) else os.urandom(16).hex()
    return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error we emit has the OpenAI shape: ours, aiohttp's (404/405/413 ...) and, last, bugs."""
    try:
        return await handler(request)
    except ProxyError as err:
        return err.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = f"{request.method} {request.path[:200]}: {exc.reason}"
        return ProxyError(exc.status, message, code=code).response(
            headers={k: v for k, v in exc.headers.items() if k == "Allow"}
        )
    except Exception:
        logger.exception("request %s: unhandled error", request.get(REQUEST_ID, "-"))
        return ProxyError(500, "internal error in manaproxy", code="internal_error").response()


def cors_middleware(origins: frozenset[str]) -> Middleware:
    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            origin = request.headers.get("Origin", "")
            if origin in origins or "*" in origins:
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


async def _on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    origins = request.app[_CORS_ORIGINS]
    origin = request.headers.get("Origin")
    if origins and origin and (origin in origins or "*" in origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, X-Mana-LLM-Resolved"
        response.headers.add("Vary", "Origin")


def create_app(
    config: Config,
    *,
    session: aiohttp.ClientSession | None = None,
    api_keys: Sequence[bytes] = (),
    cors_origins: Sequence[str] = (),
    registry: object | None = None,
    probes: bool = True,
) -> web.Application:
    """Build the application for `config`.

    `session`: the upstream `ClientSession` (one is made, and closed on cleanup, when not given).
    `api_keys`: client keys; empty means auth is off. `registry`: a prometheus `CollectorRegistry`
    for `/metrics` (None: the process-wide default). `probes`: run the active health probe loop.
    """
    middlewares: list[Middleware] = [request_id_middleware, error_middleware]
    origins = frozenset(cors_origins)
    if origins:
        middlewares.append(cors_middleware(origins))
    if api_keys:
        middlewares.append(auth_middleware(tuple(api_keys)))

    # The proxy enforces its own (reloadable) body limit while streaming the body in.
    app = web.Application(middlewares=middlewares, client_max_size=2**62)
    app[_CORS_ORIGINS] = origins
    app[catalog.MODELS_CACHE] = catalog.ModelsCache()
    app.on_response_prepare.append(_on_response_prepare)

    redactor = Redactor(config.providers.values())
    health = HealthTracker(config.health, config.providers, redactor=redactor)
    gateway = Gateway(runtime=build_runtime(config, None, redactor), health=health, redactor=redactor)
    if session is not None:
        gateway.attach(session)
    app[GATEWAY] = gateway

    from .metrics import install_metrics
    from .reqlog import log_request

    gateway.observers.append(log_request)
    install_metrics(app, gateway, registry)

    async def upstream_session_ctx(app: web.Application) -> AsyncIterator[None]:
        # Created here, in the running loop, and closed once at cleanup (unless the caller owns it).
        owned = session is None
        if owned:
            gateway.attach(make_session())
        yield
        if owned and gateway.session is not None:
            await gateway.session.close()

    app.cleanup_ctx.append(upstream_session_ctx)
    if probes:
        from .health.probe import probe_loop_ctx

        app.cleanup_ctx.append(probe_loop_ctx)

    app.router.add_get("/health", health_views.liveness)
    app.router.add_get("/v1/health", health_views.health_detail)
    app.router.add_get("/v1/models", catalog.list_models)
    app.router.add_get("/v1/models/{model:.+}", catalog.get_model)
    app.router.add_get("/v1/aliases", catalog.list_aliases)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/{path:.+}"):
        app.router.add_post(path, proxy.forward)
    return app
