"""The application's long-lived state and the one reference a reload swaps.

A `Runtime` is everything derived from one `Config`: the config itself and a provider object per
provider. `Gateway.runtime` is replaced as a whole by `Gateway.apply` (the reload's single atomic step;
`reload.py` decides when). A request reads it once when it starts and keeps that runtime to its end, so
a reload never changes a request half-way. Health state and the redactor live in the `Gateway`, not the
runtime, so they survive reloads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import aiohttp
from aiohttp import web

from .body import BodyBudget
from .cache import ResponseCache
from .config import Config
from .drain import Drain
from .health import HealthTracker
from .providers import build_provider
from .providers.base import Provider
from .record import Observer, RequestRecord
from .redact import Redactor
from .redislink import RedisLink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    providers: Mapping[str, Provider]


def build_runtime(config: Config, session: aiohttp.ClientSession | None, redactor: Redactor) -> Runtime:
    """The runtime for `config`; without a session yet (before startup) it has no provider objects."""
    if session is None:
        return Runtime(config, MappingProxyType({}))
    providers = {
        name: build_provider(spec, session, redactor, config.server) for name, spec in config.providers.items()
    }
    return Runtime(config, MappingProxyType(providers))


@dataclass(eq=False)
class Gateway:
    """Holder of the current runtime, the health tracker, the redactor, the upstream session and the
    observers of finished requests."""

    runtime: Runtime
    health: HealthTracker
    redactor: Redactor  # knows every provider key of every config loaded so far
    session: aiohttp.ClientSession | None = None  # attached at startup (see app.upstream_session)
    observers: list[Observer] = field(default_factory=list)
    body_budget: BodyBudget = field(default_factory=BodyBudget)  # request bodies held by all requests
    drain: Drain = field(default_factory=Drain)  # requests in flight, for the shutdown drain
    redis: RedisLink = field(default_factory=RedisLink)  # the one Redis connection, opened at startup (app.py)
    cache: ResponseCache = field(init=False)  # the response cache, in memory or through `redis`
    _finished: list[RequestRecord] = field(default_factory=list)  # records not yet handed to the observers

    def __post_init__(self) -> None:
        self.cache = ResponseCache(self.redis)

    def __repr__(self) -> str:
        return f"<Gateway {self.runtime.config.summary()}>"

    @classmethod
    def for_config(cls, config: Config) -> Gateway:
        """A gateway serving `config`, its providers built once a session is attached."""
        redactor = Redactor(config.providers.values())
        health = HealthTracker(config.health, config.providers, redactor=redactor)
        return cls(runtime=build_runtime(config, None, redactor), health=health, redactor=redactor)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def attach(self, session: aiohttp.ClientSession) -> None:
        """Give the gateway its upstream session and build the provider objects that use it."""
        self.session = session
        self.runtime = build_runtime(self.runtime.config, session, self.redactor)

    def apply(self, config: Config) -> None:
        """Swap in a new, already validated config: one reference, so in-flight requests keep theirs."""
        self.redactor.learn(config.providers.values())
        runtime = build_runtime(config, self.session, self.redactor)
        self.health.reconfigure(config.health, config.providers)
        self.runtime = runtime

    def observe(self, record: RequestRecord) -> None:
        """Queue a finished request's record for the observers, who see it at the end of this turn of the
        event loop, before any I/O: a request's last step is cheap, and the records of requests that
        end together are logged and counted in one warm loop (`flush`)."""
        if not self._finished:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running (a record handed over from outside one)
                self._finished.append(record)
                self.flush()
                return
        self._finished.append(record)

    def flush(self) -> None:
        """Hand every queued record to every observer; an observer's bug never costs another record."""
        records, self._finished = self._finished, []
        for observer in self.observers:
            for record in records:
                try:
                    observer(record)
                except Exception:
                    logger.exception("request observer %r failed", observer)


GATEWAY = web.AppKey("gateway", Gateway)
