"""Prometheus metrics, on an injected `CollectorRegistry`.

The `mana_llm_*` names and labels are a contract with an existing Grafana dashboard: do not rename.
Everything is recorded once per request from its `RequestRecord` (never per chunk), plus health
transitions (listener) and reloads (listener); in-flight counts are read from the health tracker at
scrape time.

Labels stay bounded: a client-supplied string becomes a label value only when it names a configured
alias, provider or chain target; anything else is reported as `other`.
"""

from __future__ import annotations

from collections.abc import Iterator
from time import perf_counter

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
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .config import ALIAS_PREFIX, Config, Target
from .record import RequestRecord
from .state import Gateway

OTHER = "other"
ALIAS_PROVIDER = "mana"  # provider label of errors on alias requests: what the caller asked for

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


class Metrics:
    """Every metric object manaproxy exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.llm_requests = Counter(
            "mana_llm_llm_requests",
            "LLM requests answered, by resolved provider/model",
            ["provider", "model", "streaming"],
            registry=registry,
        )
        self.llm_latency = Histogram(
            "mana_llm_llm_latency_seconds",
            "Duration of answered LLM requests",
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
            "Chain entries skipped or failed, and where the request went next",
            ["from_model", "to_model", "reason"],
            registry=registry,
        )
        self.provider_healthy = Gauge(
            "mana_llm_provider_healthy", "1 when the provider's breaker is closed", ["provider"], registry=registry
        )
        self.http_requests = Counter(
            "mana_llm_requests", "HTTP requests", ["method", "endpoint", "status"], registry=registry
        )
        self.http_latency = Histogram(
            "mana_llm_request_latency_seconds",
            "HTTP request duration",
            ["method", "endpoint"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "mana_llm_time_to_first_byte_seconds",
            "Time from request to the first byte sent to the client",
            ["provider", "model"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.stream_outcomes = Counter(
            "mana_llm_stream_outcomes", "How committed streams ended", ["provider", "outcome"], registry=registry
        )
        self.overhead = Histogram(
            "mana_llm_proxy_overhead_seconds",
            "Time spent in manaproxy itself per request, excluding upstream and client waits",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.reloads = Counter("mana_llm_config_reloads", "Config reload attempts", ["result"], registry=registry)


class InFlightCollector(Collector):
    """`mana_llm_requests_in_flight{provider}`, read from the health tracker at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("mana_llm_requests_in_flight", "Upstream requests in flight", labels=["provider"])
        health = self._gateway.health
        for name in self._gateway.config.providers:
            family.add_metric([name], health.get(name).in_flight)
        yield family


def _configured_targets(config: Config) -> frozenset[str]:
    return frozenset(str(target) for alias in config.aliases.values() for target in alias.chain)


class Recorder:
    """Turns request records, health transitions and reload outcomes into metric updates."""

    def __init__(self, metrics: Metrics, gateway: Gateway) -> None:
        self.metrics = metrics
        self.gateway = gateway
        self._targets_of: tuple[Config, frozenset[str]] | None = None

    def _targets(self) -> frozenset[str]:
        config = self.gateway.config
        if self._targets_of is None or self._targets_of[0] is not config:
            self._targets_of = (config, _configured_targets(config))
        return self._targets_of[1]

    def _target_labels(self, target: str | None) -> tuple[str, str]:
        """(provider, model) labels of a target; `other` for targets not named in the config."""
        if not target:
            return OTHER, OTHER
        parsed = Target.parse(target)
        provider = parsed.provider if parsed.provider in self.gateway.config.providers else OTHER
        model = parsed.model if target in self._targets() else OTHER
        return provider, model

    def _bounded_target(self, target: str) -> str:
        return target if target in self._targets() else OTHER

    def on_request(self, record: RequestRecord) -> None:
        m = self.metrics
        m.overhead.observe(record.overhead)
        self._fallbacks(record)
        answered = record.target is not None and record.status < 400 and record.error_type is None
        if answered or (record.outcome is not None and record.target is not None):
            provider, model = self._target_labels(record.target)
            m.llm_requests.labels(provider, model, "true" if record.streaming else "false").inc()
            m.llm_latency.labels(provider, model).observe(record.duration)
            if record.first_byte is not None:
                m.ttfb.labels(provider, model).observe(record.first_byte)
            if record.prompt_tokens is not None:
                m.tokens.labels(provider, model, "prompt").inc(record.prompt_tokens)
            if record.completion_tokens is not None:
                m.tokens.labels(provider, model, "completion").inc(record.completion_tokens)
            if record.alias is not None and record.alias in self.gateway.config.aliases:
                m.alias_resolved.labels(record.alias, self._bounded_target(record.target or "")).inc()
            if record.outcome is not None:
                m.stream_outcomes.labels(provider, record.outcome).inc()
        if record.error_type is not None:
            m.llm_errors.labels(*self._requested_labels(record), record.error_type).inc()

    def _requested_labels(self, record: RequestRecord) -> tuple[str, str]:
        config = self.gateway.config
        if record.alias is not None or record.requested.startswith(ALIAS_PREFIX):
            alias = record.alias or record.requested
            return ALIAS_PROVIDER, alias if alias in config.aliases else OTHER
        if record.requested_provider is not None:
            provider = record.requested_provider if record.requested_provider in config.providers else OTHER
            target = record.requested if "/" in record.requested else f"{record.requested_provider}/{record.requested}"
            return provider, Target.parse(target).model if target in self._targets() else OTHER
        return OTHER, OTHER

    def _fallbacks(self, record: RequestRecord) -> None:
        attempts = record.attempts
        if not attempts:
            return
        answered = record.target if record.status < 400 or record.outcome is not None else None
        for index, attempt in enumerate(attempts):
            to_model = attempts[index + 1].target if index + 1 < len(attempts) else answered or ""
            self.metrics.fallbacks.labels(
                self._bounded_target(attempt.target), self._bounded_target(to_model) if to_model else "", attempt.reason
            ).inc()

    def on_health(self, provider: str, healthy: bool) -> None:
        self.metrics.provider_healthy.labels(provider).set(1 if healthy else 0)

    def on_reload(self, result: str) -> None:
        self.metrics.reloads.labels(result).inc()
        self.sync_providers()

    def sync_providers(self) -> None:
        """Set the health gauge for every configured provider; drop removed ones."""
        config = self.gateway.config
        gauge = self.metrics.provider_healthy
        for name, spec in config.providers.items():
            if spec.configured:
                gauge.labels(name).set(1 if self.gateway.health.status(name) == "healthy" else 0)
        known = {labels[0] for labels in _label_sets(gauge)}
        for name in known - {n for n, s in config.providers.items() if s.configured}:
            gauge.remove(name)


def _label_sets(metric: Gauge) -> list[tuple[str, ...]]:
    return [
        tuple(sample.labels[label] for label in ("provider",))
        for family in metric.collect()
        for sample in family.samples
    ]


def http_metrics_middleware(metrics: Metrics) -> Middleware:
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
            status = 499  # cancelled: the client went away
            raise
        finally:
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else OTHER
            metrics.http_requests.labels(
                request.method if request.method in _METHODS else OTHER, endpoint, str(status)
            ).inc()
            metrics.http_latency.labels(request.method if request.method in _METHODS else OTHER, endpoint).observe(
                perf_counter() - started
            )

    return measure


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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


def install_metrics(app: web.Application, gateway: Gateway, registry: object | None) -> Metrics:
    """Register metrics, the HTTP middleware, the observers and `GET /metrics` on `app`."""
    # `*_created` series only add noise to the dashboard's queries.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    reg = registry if isinstance(registry, CollectorRegistry) else default_registry()
    metrics = Metrics(reg)
    reg.register(InFlightCollector(gateway))
    recorder = Recorder(metrics, gateway)
    gateway.observers.append(recorder.on_request)
    gateway.health.add_listener(recorder.on_health)
    gateway.reload_listeners.append(recorder.on_reload)
    recorder.sync_providers()
    app[METRICS_REGISTRY] = reg
    app.middlewares.insert(0, http_metrics_middleware(metrics))
    app.router.add_get("/metrics", metrics_view)
    return metrics
