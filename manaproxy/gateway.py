"""The application's long-lived state and the one reference a reload swaps.

A `Runtime` is everything derived from one `Config`: the config itself, a provider object per
provider and the table of client keys (those of `MANAPROXY_API_KEYS`, fixed for the process, and the
config's `clients:`). `Gateway.runtime` is replaced as a whole by `Gateway.apply` (the reload's single atomic step;
`reload.py` decides when). A request reads it once when it starts and keeps that runtime to its end, so
a reload never changes a request half-way. Health state, the redactor and the client limit windows live in
the `Gateway`, not the runtime, so they survive reloads.

A runtime's providers are closed (`Provider.aclose`) when the runtime is done with: after a reload once
every request in flight at the swap has ended (those started on it; later ones run on the new runtime), and
at shutdown (`Gateway.aclose`, from the app's cleanup) at once.
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
from .clients import ClientTable
from .config import ClientSpec, Config, ConfigError, LimitSettings
from .drain import Drain
from .health import HealthTracker
from .limits import Limiter, MemoryBackend
from .providers import build_provider
from .providers.base import Provider
from .record import Observer, RequestRecord
from .redact import Redactor
from .redislimits import RedisBackend
from .redislink import RedisLink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    providers: Mapping[str, Provider]
    clients: ClientTable = field(default_factory=ClientTable)


async def close_providers(runtime: Runtime) -> None:
    """`aclose()` every provider of `runtime`; one that fails is logged and the others still closed."""
    for name, provider in runtime.providers.items():
        try:
            await provider.aclose()
        except Exception:
            logger.exception("closing provider %s failed", name)


def build_runtime(
    config: Config,
    session: aiohttp.ClientSession | None,
    redactor: Redactor,
    env_clients: tuple[ClientSpec, ...] = (),
) -> Runtime:
    """The runtime for `config`; without a session yet (before startup) it has no provider objects.
    Raises `ConfigError` when a client of `env_clients` and one of the config share a name or a key."""
    clients = ClientTable(env_clients, config.clients)
    if session is None:
        return Runtime(config, MappingProxyType({}), clients)
    providers = {
        name: build_provider(spec, session, redactor, config.server) for name, spec in config.providers.items()
    }
    return Runtime(config, MappingProxyType(providers), clients)


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
    env_clients: tuple[ClientSpec, ...] = ()  # from MANAPROXY_API_KEYS, read once at start
    limiter: Limiter = field(default_factory=lambda: Limiter(MemoryBackend(), LimitSettings()))
    redis: RedisLink = field(default_factory=RedisLink)  # the one Redis connection, opened at startup (app.py)
    cache: ResponseCache = field(init=False)  # the response cache, in memory or through `redis`
    _finished: list[RequestRecord] = field(default_factory=list)  # records not yet handed to the observers
    _retiring: set[asyncio.Task[None]] = field(default_factory=set)  # closing replaced runtimes (`_retire`)

    def __post_init__(self) -> None:
        self.cache = ResponseCache(self.redis)
        self.limiter.shared = RedisBackend(self.redis)  # `limits: {backend: redis}`, through the one connection
        self.limiter.configure(self.limiter.settings)

    def __repr__(self) -> str:
        return f"<Gateway {self.runtime.config.summary()}>"

    @classmethod
    def for_config(cls, config: Config, env_clients: tuple[ClientSpec, ...] = ()) -> Gateway:
        """A gateway serving `config` (and the clients of `MANAPROXY_API_KEYS`, `env_clients`), its providers
        built once a session is attached. Raises `ConfigError` for a client declared in both places."""
        redactor = Redactor(config.providers.values())
        health = HealthTracker(config.health, config.providers, redactor=redactor)
        runtime = build_runtime(config, None, redactor, env_clients)
        limiter = Limiter(MemoryBackend(), config.limits)
        return cls(runtime=runtime, health=health, redactor=redactor, env_clients=env_clients, limiter=limiter)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def attach(self, session: aiohttp.ClientSession) -> None:
        """Give the gateway its upstream session and build the provider objects that use it."""
        self.session = session
        self.runtime = build_runtime(self.runtime.config, session, self.redactor, self.env_clients)

    def apply(self, config: Config) -> None:
        """Swap in a new, already validated config: one reference, so in-flight requests keep theirs. Raises
        `ConfigError` (nothing changed) for a config this process cannot serve as it stands."""
        ClientTable(self.env_clients, config.clients)  # a name or key in both places: refused, nothing changed
        self._check_redis(config)
        self.redactor.learn(config.providers.values())
        runtime = build_runtime(config, self.session, self.redactor, self.env_clients)
        self.health.reconfigure(config.health, config.providers)
        self.limiter.configure(config.limits)  # the windows stay: a reload does not give a client a fresh minute
        replaced, self.runtime = self.runtime, runtime
        self._retire(replaced)

    def _check_redis(self, config: Config) -> None:
        """Refuse a feature that needs the Redis link when none was opened: the link is opened once, at start,
        from the `redis:` section then (redislink.py), so such a feature could never work until a restart.
        (With a link open, a changed `redis:` keeps the old link: the reload warns and the features work.)"""
        if self.redis.configured:
            return
        wanted = {
            "limits.backend": config.limits.backend == "redis",
            "cache.backend": config.cache.backend == "redis",
            "health.shared": config.health.shared,
        }
        for place, needs_redis in wanted.items():
            if needs_redis:
                raise ConfigError(f"{config.source}: {place}: needs redis.url at start; restart to enable")

    def _retire(self, runtime: Runtime) -> None:
        """Close `runtime`'s providers once the requests that started on it have ended."""
        if not runtime.providers:
            return  # no session yet: nothing was built
        requests_ended = self.drain.requests_ended()
        task = asyncio.get_running_loop().create_task(self._close_after(runtime, requests_ended))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _close_after(runtime: Runtime, requests_ended: asyncio.Future[None]) -> None:
        try:
            await requests_ended
        finally:  # at shutdown (cancelled) too
            await close_providers(runtime)

    async def aclose(self) -> None:
        """Shutdown: close every provider now, those of replaced runtimes still waiting for requests too."""
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        await close_providers(self.runtime)

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
