"""`GET /health` (liveness, for load balancers) and `GET /v1/health` (per-provider detail, for people on call).

Rule of this module: read-only. It shows the tracker's state and never a secret: `last_error` went
through the redactor when it was recorded, and so did a rejected reload's error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from .. import __version__
from ..config import ProviderConfig
from ..gateway import GATEWAY
from ..health import RATE_LIMITED, UNCONFIGURED, Breaker, HealthTracker
from ..reload import RELOADER
from .json import json_response

# When the application was made (`create_app`): the process's uptime in `/v1/health`.
STARTED_UNIX = web.AppKey("started_unix", float)


def _breaker_view(tracker: HealthTracker, breaker: Breaker, now: float) -> dict[str, object]:
    until = breaker.unavailable_until()
    if not breaker.is_healthy(now):
        status = "unhealthy"
    elif breaker.rate_limited_until > now:
        status = RATE_LIMITED
    else:
        status = "healthy"
    since = breaker.since
    if status == "healthy" and breaker.rate_limited_until > (since or 0.0):
        since = breaker.rate_limited_until  # healthy again since its rate-limit window ended
    return {
        "status": status,
        "breaker": breaker.state(now),
        "since_unix": None if since is None else round(tracker.unix(since, now), 3),
        "consecutive_failures": breaker.consecutive_failures,
        "last_error": breaker.last_error,
        "last_check_unix": None if breaker.last_check is None else round(tracker.unix(breaker.last_check, now), 3),
        "unhealthy_until_unix": round(tracker.unix(until, now), 3) if until > now else None,
    }


def snapshot(tracker: HealthTracker, providers: Iterable[ProviderConfig]) -> dict[str, dict[str, object]]:
    """Per-provider view for `/v1/health`: the provider's own breaker (transport failures, probes) and, under
    `models`, the breaker of each of its models that has been asked for (HTTP errors of plain chat, rate limits),
    with `kinds` holding the model's breakers for other kinds of request (`embeddings`, `chat+image` ...)."""
    now = tracker.now()
    view: dict[str, dict[str, object]] = {}
    for provider in providers:
        record = tracker.get(provider.name)
        entry = _breaker_view(tracker, record.breaker, now)
        if not provider.configured:
            entry["status"] = UNCONFIGURED
        entry.update(
            kind=provider.kind,
            configured=provider.configured,
            in_flight=record.in_flight,
            max_concurrent=provider.max_concurrent,
            max_concurrent_auto=provider.auto_concurrency is not None,
            probes_in_flight=record.probing,
            last_latency_seconds=None if record.last_latency is None else round(record.last_latency, 4),
            models={
                model: {
                    **_breaker_view(tracker, target.breaker, now),
                    "in_flight": target.in_flight,
                    # `max_concurrent: auto`: the learned limit and the times it goes by (`health/capacity.py`).
                    "concurrency": None if target.capacity is None else target.capacity.view(now),
                    # Breakers of the other kinds of request than plain chat (`kinds.py`): embeddings, chat+image ...
                    "kinds": {kind: _breaker_view(tracker, breaker, now) for kind, breaker in target.kinds.items()},
                }
                for model, target in record.targets.items()
            },
        )
        view[provider.name] = entry
    return view


def overall_status(statuses: list[str]) -> str:
    """healthy: every configured provider healthy; unhealthy: none is; degraded: in between."""
    configured = [status for status in statuses if status != UNCONFIGURED]
    healthy = sum(1 for status in configured if status == "healthy")
    if configured and healthy == len(configured):
        return "healthy"
    return "unhealthy" if healthy == 0 else "degraded"


def _current(request: web.Request) -> tuple[str, dict[str, dict[str, object]]]:
    """(overall status, per-provider snapshot) of the current config."""
    gateway = request.app[GATEWAY]
    view = snapshot(gateway.health, gateway.config.providers.values())
    return overall_status([str(item["status"]) for item in view.values()]), view


# `service` of `GET /health`: mana-llm's own value. manaproxy takes mana-llm's place in front of the apps, as its
# metric names (`mana_llm_*`) and scrape job do, so uptime checks and dashboards that read it keep working;
# `version` is manaproxy's.
SERVICE = "mana-llm"


async def liveness(request: web.Request) -> web.Response:
    """`GET /health`: always 200 while serving; the status says how many providers are up (mana-llm's shape:
    `status`, `service`, `version`, `providers`)."""
    status, view = _current(request)
    providers = {
        name: "healthy" if item["status"] == "healthy" else "unhealthy"
        for name, item in view.items()
        if item["configured"]
    }
    return json_response({"status": status, "service": SERVICE, "version": __version__, "providers": providers})


def process_view(request: web.Request) -> dict[str, Any]:
    """The process: version, uptime, the config file serving now and when it was loaded; its pid and, under
    `server.workers` > 1, which worker it is (every view is the answering worker's own)."""
    config = request.app[GATEWAY].config
    started = request.app[STARTED_UNIX]
    worker = os.environ.get("MANAPROXY_WORKER")  # the worker's index, set by the supervisor (hostmetrics.WORKER_ENV)
    return {
        "version": __version__,
        "pid": os.getpid(),
        "worker": int(worker) if worker and worker.isdigit() else None,
        "started_unix": round(started, 3),
        "uptime_seconds": round(time.time() - started, 1),
        "config": config.source,
        "config_loaded_unix": config.loaded_unix,
    }


def reloads_view(request: web.Request) -> list[dict[str, Any]]:
    """The last reloads, newest first: when, `success` or `failure`, and a rejected one's error."""
    return [
        {"time_unix": round(outcome.time_unix, 3), "result": outcome.result, "error": outcome.error}
        for outcome in reversed(request.app[RELOADER].recent)
    ]


async def health_detail(request: web.Request) -> web.Response:
    """`GET /v1/health`: every provider's breaker, last error, in-flight count …; the process and its reloads."""
    status, view = _current(request)
    return json_response(
        {"status": status, "providers": view, "process": process_view(request), "reloads": reloads_view(request)}
    )
