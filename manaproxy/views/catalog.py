"""Read-only views of what can be asked for: `/v1/models`, `/v1/models/{id}`, `/v1/aliases`.

Provider model lists are fetched from each configured provider's `/models` in parallel, each bounded
by the probe timeout, and cached for `server.models_cache_seconds`; a provider that fails to list is
left out, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..config import Alias, Config, lone
from ..errors import ProxyError
from ..gateway import GATEWAY, Gateway, Runtime
from ..health import HealthTracker
from ..providers.base import ListedModel, Provider, UpstreamFailure
from .json import json_response

logger = logging.getLogger(__name__)


class ModelsCache:
    """Per-provider model lists with a short time-to-live; a failed listing is remembered briefly too."""

    # A provider that failed to list is asked again after this long (or the cache TTL, if shorter),
    # so a hanging provider does not make every /v1/models call wait for its timeout.
    FAILED_RETRY_SECONDS = 10.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lists: dict[str, tuple[float, Provider, list[ListedModel]]] = {}  # name -> (expires, provider, models)
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<ModelsCache {sorted(self._lists)}>"

    async def models(self, runtime: Runtime) -> dict[str, list[ListedModel]]:
        """Model ids per configured provider; providers that failed to list are left out."""
        config = runtime.config
        ttl = config.server.models_cache_seconds
        async with self._lock:  # one refresh at a time; concurrent callers share its result
            now = self._clock()
            stale = [
                name
                for name, spec in config.providers.items()
                if spec.configured
                and (
                    name not in self._lists
                    or now >= self._lists[name][0]
                    or self._lists[name][1] is not runtime.providers[name]  # changed by a reload
                )
            ]
            if stale:
                timeout = config.health.probe_timeout_seconds
                results = await asyncio.gather(
                    *(runtime.providers[name].list_models(timeout) for name in stale), return_exceptions=True
                )
                for name, result in zip(stale, results, strict=True):
                    if isinstance(result, BaseException):
                        # The reason word only: an upstream's error text may echo our key back.
                        reason = result.reason if isinstance(result, UpstreamFailure) else type(result).__name__
                        logger.info("provider %s did not list its models (%s)", name, reason)
                        expires, ids = now + min(ttl, self.FAILED_RETRY_SECONDS), []
                    else:
                        expires, ids = now + ttl, result
                    self._lists[name] = (expires, runtime.providers[name], ids)
        return {
            name: self._lists[name][2]
            for name, spec in config.providers.items()
            if spec.configured and name in self._lists
        }


MODELS_CACHE = web.AppKey("models_cache", ModelsCache)


def _model_object(model_id: str, owned_by: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, **extra}


async def _all_models(request: web.Request) -> list[dict[str, Any]]:
    gateway = request.app[GATEWAY]
    runtime = gateway.runtime
    config = runtime.config
    loaded = config.loaded_unix  # aliases, and models whose upstream gives no date, date from the config
    data = [
        _model_object(alias.name, "manaproxy", loaded, description=alias.description)
        for alias in config.aliases.values()
    ]
    lists = await request.app[MODELS_CACHE].models(runtime)
    for provider, models in lists.items():
        data.extend(
            _model_object(f"{provider}/{model_id}", provider, loaded if created is None else created)
            for model_id, created in models
        )
    return data


async def list_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": await _all_models(request)})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    config = request.app[GATEWAY].config
    alias = config.aliases.get(model_id)
    if alias is not None:
        return json_response(_model_object(alias.name, "manaproxy", config.loaded_unix, description=alias.description))
    for item in await _all_models(request):
        if item["id"] == model_id:
            return json_response(item)
    raise ProxyError(404, f"The model '{model_id[:200]}' does not exist", code="model_not_found", param="model")


def alias_view(config: Config, gateway: Gateway) -> dict[str, Any]:
    """Aliases with, for each chain entry, whether it would be tried right now and why not.

    An alias with pools or hedging shows its steps as configured (a pool as a list of `{target, weight}`),
    each entry's step and weight, and its hedge setting with the delay in force now; a plain chain keeps
    the shape it always had.
    """
    health = gateway.health
    aliases = []
    for alias in config.aliases.values():
        entries = []
        serving = None
        alone = lone(alias.steps)  # its request is the trial of an open breaker
        for position, step in enumerate(alias.steps):
            for member in step.members:
                target = member.target
                skip = health.skip_reason(config.providers[target.provider], target.model, member=member)
                entry: dict[str, Any] = {"target": str(target), "available": skip is None, "reason": skip}
                if skip is not None:
                    entry["until_unix"] = health.unavailable_until(target.provider, target.model)
                    entry["retry_unix"] = health.retry_unix(target.provider, target.model, lone=alone)
                elif serving is None:
                    serving = str(target)
                if not alias.plain:
                    entry.update(step=position, weight=member.weight)
                entries.append(entry)
        view: dict[str, Any] = {"name": alias.name, "description": alias.description}
        if alias.plain:
            view["chain"] = [str(target) for target in alias.chain]
        else:
            view["chain"] = [
                [{"target": str(m.target), "weight": m.weight} for m in step.members]
                if step.pool
                else str(step.members[0].target)
                for step in alias.steps
            ]
            view["hedge"] = _hedge_view(alias, health)
        view.update(serving=serving, entries=entries)
        aliases.append(view)
    return {"default": config.default, "aliases": aliases}


def _hedge_view(alias: Alias, health: HealthTracker) -> dict[str, Any] | None:
    hedge = alias.hedge
    if hedge is None:
        return None
    if hedge.after is not None:
        return {"after": hedge.after, "delay_seconds": hedge.after, "max": hedge.max_extra}
    first = alias.steps[0].members[0].target
    delays = {}
    for kind, stream in (("stream", True), ("unstreamed", False)):
        delay = hedge.delay(health.ttfb_p95(first.provider, first.model, stream=stream))
        delays[kind] = None if delay is None else round(delay, 4)
    return {
        "after": "auto",
        "delay_seconds": delays,  # null until enough answers of that kind were seen: no hedging yet
        "max": hedge.max_extra,
        "min_delay": hedge.min_delay,
        "max_delay": hedge.max_delay,
    }


async def list_aliases(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    return json_response(alias_view(gateway.config, gateway))
