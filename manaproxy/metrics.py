"""Prometheus metrics, on an injected `CollectorRegistry`.

The `mana_llm_*` names and labels are a contract with an existing Grafana dashboard: do not rename.
Everything is recorded once per request from its `RequestRecord` (never per chunk), plus health
transitions (listener) and reloads (listener); in-flight counts and per-alias health are read from the
health tracker at scrape time. docs/metrics.md is the reference for every name, label and value.
With workers (`server.workers` > 1) a scrape reports the whole host: hostmetrics.py.

Rule of this module: labels stay bounded. A client-supplied string becomes a label value only when it
names a configured alias, a configured provider or a `provider/model` entry of a configured alias chain;
anything else is reported as `other`. Words made by manaproxy itself (fallback reasons, error types,
stream outcomes) are checked against a short-word pattern all the same.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from time import perf_counter
from typing import TypeVar, cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import cache
from .config import ALIAS_PREFIX, Config, Member, Target
from .failures import HEDGED_LOST, WON
from .gateway import Gateway
from .health import HealthTracker
from .hostmetrics import PROVIDER_HEALTHY_MODE, SharedState, host_registry, shared_dir
from .record import RequestRecord
from .reload import Reloader

M = TypeVar("M", Counter, Histogram)

OTHER = "other"
DIRECT = "direct"  # `alias` label of a request that named a provider/model (or a bare model), and of its cache counter
ALIAS_PROVIDER = "mana"  # `provider` label of an alias request that no target answered: what the caller asked for

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

# Reasons, error types and outcomes are short words of our own (`http_503`, `all_failed` ...).
_WORD_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def _word(value: str | None) -> str:
    return value if value is not None and _WORD_RE.match(value) else OTHER


class Children:
    """Labelled children of metrics, looked up once per label set: `.labels()` takes a lock, checks and
    joins the values on every call, and this runs several times per request. The label sets are bounded
    (the module's rule), and prometheus_client keeps every child it made anyway, so this holds no more."""

    __slots__ = ("_children",)

    def __init__(self) -> None:
        self._children: dict[tuple[Counter | Histogram, tuple[str, ...]], Counter | Histogram] = {}

    def __call__(self, metric: M, *labels: str) -> M:
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children[(metric, labels)] = metric.labels(*labels)
        return cast(M, child)


class Metrics:
    """Every metric object manaproxy exports (the scrape-time gauges live in `StateCollector`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # What `/metrics` reports: `registry`, or with workers every worker's metric files (hostmetrics.py).
        self.scrape_registry = registry
        self.shared: SharedState | None = None  # with workers: this worker's scrape-time gauges, published
        self.llm_requests = Counter(
            "mana_llm_llm_requests",
            "LLM requests: answered ones by resolved provider/model, the others by what the caller asked for",
            ["provider", "model", "streaming"],
            registry=registry,
        )
        self.llm_latency = Histogram(
            "mana_llm_llm_latency_seconds",
            "Duration of answered LLM requests, to the last byte",
            ["provider", "model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "mana_llm_tokens", "Tokens reported by upstreams", ["provider", "model", "type"], registry=registry
        )
        self.llm_errors = Counter(
            "mana_llm_llm_errors",
            "LLM requests that failed, by what the caller asked for",
            ["provider", "model", "error_type"],
            registry=registry,
        )
        self.alias_resolved = Counter(
            "mana_llm_alias_resolved",
            "Alias requests by the chain entry that answered",
            ["alias", "target"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "mana_llm_fallback",
            "Chain entries skipped or failed, and the entry tried next (empty: the chain ran out)",
            ["from_model", "to_model", "reason"],
            registry=registry,
        )
        self.provider_healthy = Gauge(
            "mana_llm_provider_healthy",
            "1 while the provider's breaker is closed, 0 while it is open or half-open",
            ["provider"],
            registry=registry,
            multiprocess_mode=PROVIDER_HEALTHY_MODE,
        )
        self.http_requests = Counter(
            "mana_llm_requests", "HTTP requests by route pattern", ["method", "endpoint", "status"], registry=registry
        )
        self.http_latency = Histogram(
            "mana_llm_request_latency_seconds",
            "HTTP request duration by route pattern",
            ["method", "endpoint"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "mana_llm_time_to_first_byte_seconds",
            "Streamed answers: time from the request to the first byte sent to the client",
            ["provider", "model"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.stream_outcomes = Counter(
            "mana_llm_stream_outcomes", "How committed streams ended", ["provider", "outcome"], registry=registry
        )
        self.overhead = Histogram(
            "mana_llm_proxy_overhead_seconds",
            "Time spent in manaproxy itself per LLM request, excluding upstream and client waits",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.cache_requests = Counter(
            "mana_llm_cache_requests",
            "Requests of caching aliases (and cached provider/model requests: alias `direct`) by what the cache did",
            ["alias", "result"],
            registry=registry,
        )
        self.reloads = Counter("mana_llm_config_reloads", "Config reload attempts", ["result"], registry=registry)
        self.client_requests = Counter(
            "mana_llm_client_requests",
            "Proxied requests by client (its name; anonymous with auth off), alias asked for and status class",
            ["client", "alias", "status_class"],
            registry=registry,
        )
        self.client_tokens = Counter(
            "mana_llm_client_tokens",
            "Tokens reported by upstreams, by client and by the provider/model that answered",
            ["client", "provider", "model", "type"],
            registry=registry,
        )
        self.hedged = Counter(
            "mana_llm_hedged_requests",
            "Requests of a hedging alias that raced a second attempt, by which won",
            ["alias", "outcome"],
            registry=registry,
        )

    @property
    def middleware(self) -> Middleware:
        """`mana_llm_requests_total` / `mana_llm_request_latency_seconds`, labelled with the route pattern."""
        http_requests, http_latency = self.http_requests, self.http_latency
        child = Children()

        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = perf_counter()
            status = 500
            try:
                response: web.StreamResponse = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except BaseException:
                status = 499  # cancelled: the client went away (as nginx logs it)
                raise
            finally:
                # The pattern (`/v1/models/{model}`), never the path; unmatched paths (404/405) share one value.
                resource = request.match_info.route.resource
                endpoint = resource.canonical if resource is not None else OTHER
                method = request.method if request.method in _METHODS else OTHER
                child(http_requests, method, endpoint, str(status)).inc()
                child(http_latency, method, endpoint).observe(perf_counter() - started)

        return measure

    def add_collector(self, collector: Collector) -> None:
        """Report a scrape-time collector of a part set up later (shared health): on `registry`, or with workers
        among the sources `shared` copies into this worker's metric files (a scrape reads only those)."""
        if self.shared is not None:
            self.shared.add_source(collector)
        else:
            self.registry.register(collector)

    async def view(self, request: web.Request) -> web.Response:
        """`GET /metrics`: Prometheus' text format."""
        if self.shared is not None:
            self.shared.publish()  # this worker's own gauges as of now; the others' are at most a second old
        return web.Response(body=generate_latest(self.scrape_registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def sharing(self, app: web.Application) -> AsyncIterator[None]:
        """`cleanup_ctx`: with workers, publish this worker's scrape-time gauges while the app runs."""
        if self.shared is None:
            yield
            return
        async for _ in self.shared.sharing()(app):
            yield


class StateCollector(Collector):
    """Gauges read from the health tracker at scrape time, so the hot path never updates them.

    `mana_llm_requests_in_flight{provider}`: upstream calls in flight.
    `mana_llm_alias_healthy_targets{alias}`: chain entries whose provider is configured and healthy and whose
    model's own breaker is closed; 0 means every entry of the alias is down (the
    `ManaLLMAliasAllEntriesUnhealthy` alert).
    `mana_llm_target_healthy{target}`: 1 while a chain entry can be used (provider and model breakers
    closed), for the `provider/model` entries of configured aliases only.
    `mana_llm_concurrency_limit{target}`: the requests a chain entry may have in flight — learned
    (`max_concurrent: auto`) or its provider's fixed `max_concurrent` — for entries of configured aliases that
    have a limit.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        config = self._gateway.config
        health = self._gateway.health
        in_flight = GaugeMetricFamily("mana_llm_requests_in_flight", "Upstream calls in flight", labels=["provider"])
        for name in config.providers:
            in_flight.add_metric([name], health.get(name).in_flight)
        yield in_flight
        healthy = {
            name for name, spec in config.providers.items() if spec.configured and health.status(name) == "healthy"
        }
        usable = {
            target: target.provider in healthy and health.target_healthy(target.provider, target.model)
            for alias in config.aliases.values()
            for target in alias.chain
        }
        aliases = GaugeMetricFamily(
            "mana_llm_alias_healthy_targets",
            "Chain entries of the alias whose provider is configured and healthy and whose model's breaker is closed",
            labels=["alias"],
        )
        for name, alias in config.aliases.items():
            aliases.add_metric([name], sum(1 for target in alias.chain if usable[target]))
        yield aliases
        targets = GaugeMetricFamily(
            "mana_llm_target_healthy",
            "1 while the chain entry (provider/model) can be used: provider and model breakers closed",
            labels=["target"],
        )
        for target, ok in usable.items():
            targets.add_metric([str(target)], 1 if ok else 0)
        yield targets
        errors = CounterMetricFamily(
            "mana_llm_client_limit_errors",
            "Client limit checks the limit backend failed (let in or refused as limits.on_backend_error says)",
        )
        errors.add_metric([], self._gateway.limiter.errors)
        yield errors
        limits = GaugeMetricFamily(
            "mana_llm_concurrency_limit",
            "Requests the chain entry (provider/model) may have in flight: learned (max_concurrent: auto) or fixed",
            labels=["target"],
        )
        in_force: dict[Target, int] = {}
        for alias in config.aliases.values():
            for step in alias.steps:
                for member in step.members:
                    limit = _limit(config, health, member)
                    if limit:
                        in_force[member.target] = limit
        for target, limit in in_force.items():
            limits.add_metric([str(target)], limit)
        yield limits


class SharedStateCollector(Collector):
    """What the response cache and the Redis link hold, read at scrape time.

    `mana_llm_cache_bytes`: bytes of the memory backend's entries (0 with the redis backend).
    `mana_llm_redis_errors_total{feature}`: Redis commands that did not run (failed, timed out, or skipped
    while Redis is down), by the feature that asked.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stored = GaugeMetricFamily("mana_llm_cache_bytes", "Bytes held by the memory backend of the response cache")
        stored.add_metric([], self._gateway.cache.memory.size)
        yield stored
        errors = CounterMetricFamily(
            "mana_llm_redis_errors",
            "Redis commands that did not run (failed, timed out, skipped while Redis is down), by feature",
            labels=["feature"],
        )
        for feature, count in {cache.FEATURE: 0, **self._gateway.redis.errors}.items():
            errors.add_metric([feature], count)
        yield errors


def _limit(config: Config, health: HealthTracker, member: Member) -> int:
    """The limit in force on requests in flight to a chain entry: the member's own, else its provider's; fixed,
    or learned (its `min_concurrent` until the target's first request); 0: none."""
    provider = config.providers[member.target.provider]
    if member.max_concurrent:
        return member.max_concurrent
    bounds = member.auto_concurrency or provider.auto_concurrency
    if bounds is None:
        return provider.max_concurrent
    capacity = health.target(member.target.provider, member.target.model).capacity
    return bounds.min_concurrent if capacity is None else capacity.allowed


def _configured_targets(config: Config) -> frozenset[Target]:
    return frozenset(target for alias in config.aliases.values() for target in alias.chain)


class Recorder:
    """Turns request records, health transitions and reload outcomes into metric updates."""

    def __init__(self, metrics: Metrics, gateway: Gateway) -> None:
        self.metrics = metrics
        self.gateway = gateway
        self._targets_of: tuple[Config, frozenset[Target]] | None = None
        self._gauged: set[str] = set()  # providers that have a `provider_healthy` series
        self._child = Children()

    def __repr__(self) -> str:
        return f"<Recorder gauged={sorted(self._gauged)}>"

    def _targets(self) -> frozenset[Target]:
        config = self.gateway.config
        if self._targets_of is None or self._targets_of[0] is not config:
            self._targets_of = (config, _configured_targets(config))
        return self._targets_of[1]

    def _bounded_target(self, target: Target) -> str:
        return str(target) if target in self._targets() else OTHER

    def _target_labels(self, target: Target) -> tuple[str, str]:
        """(provider, model) labels of the target that answered; `other` for what the config does not name."""
        provider = target.provider if target.provider in self.gateway.config.providers else OTHER
        model = target.model if target in self._targets() else OTHER
        return provider, model

    def _requested_labels(self, record: RequestRecord) -> tuple[str, str]:
        """(provider, model) labels of what the caller asked for, bounded."""
        config = self.gateway.config
        if record.alias is not None or record.requested.startswith(ALIAS_PREFIX):
            alias = record.alias or record.requested
            return ALIAS_PROVIDER, alias if alias in config.aliases else OTHER
        if record.requested_provider is not None:
            provider = record.requested_provider if record.requested_provider in config.providers else OTHER
            asked = record.requested if "/" in record.requested else f"{record.requested_provider}/{record.requested}"
            target = Target(*asked.split("/", 1))  # as `Target.parse` splits it, unchecked: compared only
            return provider, target.model if target in self._targets() else OTHER
        return OTHER, OTHER

    def on_request(self, record: RequestRecord) -> None:
        m = self.metrics
        m.overhead.observe(record.overhead)
        if record.cache is not None:
            self._child(m.cache_requests, self._cache_alias(record), _word(record.cache)).inc()
            if record.cache == cache.HIT:  # no provider answered: the LLM, health and fallback series stay as they are
                self._client(record)  # but the client asked, and its request counted against its limits
                return
        self._fallbacks(record)
        streaming = "true" if record.streaming else "false"
        target = record.target
        # Answered: a 2xx reply, or a committed stream however it ended (the answer was that target's).
        # A relayed caller 4xx has a target too, but counts on the error side: what the caller asked for.
        if target is not None and (record.outcome is not None or record.status < 400):
            provider, model = self._target_labels(target)
            self._child(m.llm_requests, provider, model, streaming).inc()
            self._child(m.llm_latency, provider, model).observe(record.duration)
            if record.streaming and record.first_byte is not None:
                self._child(m.ttfb, provider, model).observe(record.first_byte)
            if record.prompt_tokens is not None:
                self._child(m.tokens, provider, model, "prompt").inc(record.prompt_tokens)
            if record.completion_tokens is not None:
                self._child(m.tokens, provider, model, "completion").inc(record.completion_tokens)
            if record.outcome is not None:
                self._child(m.stream_outcomes, provider, _word(record.outcome)).inc()
        else:
            self._child(m.llm_requests, *self._requested_labels(record), streaming).inc()
        if target is not None and record.alias is not None and record.alias in self.gateway.config.aliases:
            self._child(m.alias_resolved, record.alias, self._bounded_target(target)).inc()
            if record.hedge is not None:
                self._child(m.hedged, record.alias, _word(record.hedge)).inc()
        if record.error_type is not None:
            self._child(m.llm_errors, *self._requested_labels(record), _word(record.error_type)).inc()
        self._client(record)

    def _client(self, record: RequestRecord) -> None:
        """`mana_llm_client_requests_total` and `mana_llm_client_tokens_total`. The client label is a name the
        config (or MANAPROXY_API_KEYS) declared, or `anonymous`; the alias one a configured alias, `direct` for
        a request naming a provider/model or a bare model, `other` for anything else."""
        m = self.metrics
        client = record.client
        if record.alias is not None or record.requested.startswith(ALIAS_PREFIX) or not record.requested:
            asked = record.alias or record.requested or self.gateway.config.default or ""
            alias = asked if asked in self.gateway.config.aliases else OTHER
        else:
            alias = DIRECT
        status_class = f"{min(max(record.status, 100), 599) // 100}xx" if record.status else OTHER
        self._child(m.client_requests, client, alias, status_class).inc()
        if record.target is not None and (record.prompt_tokens is not None or record.completion_tokens is not None):
            provider, model = self._target_labels(record.target)
            if record.prompt_tokens is not None:
                self._child(m.client_tokens, client, provider, model, "prompt").inc(record.prompt_tokens)
            if record.completion_tokens is not None:
                self._child(m.client_tokens, client, provider, model, "completion").inc(record.completion_tokens)

    def _cache_alias(self, record: RequestRecord) -> str:
        """`alias` label of the cache counter: the configured alias, or `direct` for a provider/model request."""
        if record.alias is None:
            return DIRECT
        return record.alias if record.alias in self.gateway.config.aliases else OTHER

    def _fallbacks(self, record: RequestRecord) -> None:
        """One count per skipped or failed chain entry, naming the entry the request went to next. The
        attempts of a hedged race (the winner, the losers cancelled) are no fallbacks."""
        attempts = [attempt for attempt in record.attempts if attempt.reason not in (HEDGED_LOST, WON)]
        if not attempts:
            return
        last_next: Target | None
        if record.target is not None:
            last_next = record.target  # answered, or relayed the caller's 4xx
        elif record.error_type is not None:
            last_next = None  # the chain ran out
        else:
            last_next = self._in_flight(record)  # the client left while the next entry was being tried
        for index, attempt in enumerate(attempts):
            to_model = attempts[index + 1].target if index + 1 < len(attempts) else last_next
            self._child(
                self.metrics.fallbacks,
                self._bounded_target(attempt.target),
                self._bounded_target(to_model) if to_model is not None else "",
                _word(attempt.reason),
            ).inc()

    @staticmethod
    def _in_flight(record: RequestRecord) -> Target | None:
        """The target of the latest call still in flight when the client left: every call started, less
        those that failed (an answer, or a hedge that lost at the commit, means the request did not end here)."""
        calls = list(record.calls)
        for attempt in record.attempts:
            if attempt.tried and attempt.target in calls:  # a target is called at most once per request
                calls.remove(attempt.target)
        return calls[-1] if calls else None

    def on_health(self, provider: str, healthy: bool) -> None:
        spec = self.gateway.config.providers.get(provider)
        if spec is not None and spec.configured:
            self.metrics.provider_healthy.labels(provider).set(1 if healthy else 0)
            self._gauged.add(provider)

    def on_reload(self, result: str) -> None:
        self.metrics.reloads.labels(_word(result)).inc()
        self.sync_providers()

    def sync_providers(self) -> None:
        """Set the health gauge of every configured provider; drop the series of removed ones."""
        config = self.gateway.config
        health = self.gateway.health
        gauge = self.metrics.provider_healthy
        wanted = {name for name, spec in config.providers.items() if spec.configured}
        for name in wanted:
            gauge.labels(name).set(1 if health.status(name) == "healthy" else 0)
        for name in self._gauged - wanted:
            gauge.remove(name)
        self._gauged = wanted


def default_registry() -> CollectorRegistry:
    """A fresh registry with the process and platform collectors (what the global one would have)."""
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def instrument(gateway: Gateway, reloader: Reloader, registry: CollectorRegistry | None = None) -> Metrics:
    """The metrics of one application on `registry` (a fresh one with process metrics when None), fed by
    the gateway's finished requests, its health transitions and the reloader's outcomes."""
    # `*_created` series only add noise to the dashboard's queries.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    shared = shared_dir()
    if registry is None:
        # With workers, process metrics would be those of whichever worker a scrape reached: none then.
        registry = CollectorRegistry() if shared is not None else default_registry()
    metrics = Metrics(registry)
    if shared is None:
        metrics.registry.register(StateCollector(gateway))
        metrics.registry.register(SharedStateCollector(gateway))
    else:
        metrics.shared = SharedState([StateCollector(gateway), SharedStateCollector(gateway)], metrics.registry)
        metrics.scrape_registry = host_registry(shared)
    recorder = Recorder(metrics, gateway)
    gateway.observers.append(recorder.on_request)
    gateway.health.add_listener(recorder.on_health)
    reloader.listeners.append(recorder.on_reload)
    recorder.sync_providers()
    return metrics
