"""Metrics for the whole host when workers share it: prometheus_client's multiprocess mode.

Rule of this module: it is in play only in a worker of a supervisor (supervisor.py), which sets
`$PROMETHEUS_MULTIPROC_DIR` (what makes prometheus_client keep every value in a per-process file there) and
`$MANAPROXY_WORKER`; with one process (`server.workers: 1`) nothing here runs, whatever the environment.

A scrape of `/metrics`, whichever worker answers it, reads every worker's files (`MultiProcessCollector`):
counters and histograms are summed, those of dead workers included, so no counter goes backwards when a
worker is restarted. The gauges `StateCollector` computes at scrape time from one process's health tracker
are copied into file-backed gauges by each worker (`SharedState.publish`, every `PUBLISH_SECONDS` and
before each scrape it answers), combined as `GAUGE_MODES` says: in-flight calls summed over the live
workers, health as the worst of them (docs/metrics.md says why).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "MANAPROXY_WORKER"  # the worker's index, set by the supervisor
PUBLISH_SECONDS = 1.0

Mode = Literal["livesum", "livemin", "livemax", "liveall"]
# How each worker's scrape-time gauge is combined for the host. A family not named here is reported per
# worker (`pid` label): never a sum or a minimum that would mean nothing.
GAUGE_MODES: dict[str, Mode] = {
    "mana_llm_requests_in_flight": "livesum",
    "mana_llm_alias_healthy_targets": "livemin",
    "mana_llm_target_healthy": "livemin",
    "mana_llm_cache_bytes": "livesum",  # each worker's memory backend holds its own entries
    "mana_llm_concurrency_limit": "livesum",  # each worker learns and keeps its own limit: the host's is their sum
}
# `mana_llm_provider_healthy` is a plain gauge the recorder sets: its mode is given where it is made.
PROVIDER_HEALTHY_MODE: Mode = "livemin"


def shared_dir() -> str | None:
    """The directory every worker's metric files are in, or None with one process."""
    return (os.environ.get(ENV) or None) if os.environ.get(WORKER_ENV) else None


def host_registry(path: str) -> CollectorRegistry:
    """The registry a scrape reads: every worker's files, summed."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return registry


class SharedState:
    """Copies what scrape-time collectors report into metrics kept in this worker's metric files: a gauge as a
    gauge (combined as `GAUGE_MODES` says), a counter as a counter advanced by what it grew since the last
    copy (summed over every worker, the dead ones too: it never goes backwards)."""

    def __init__(self, sources: Iterable[Collector], registry: CollectorRegistry) -> None:
        self._sources = list(sources)
        self._registry = registry
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._counted: dict[
            tuple[str, tuple[tuple[str, str], ...]], float
        ] = {}  # what each series had at the last copy

    def __repr__(self) -> str:
        return f"<SharedState gauges={sorted(self._gauges)} counters={sorted(self._counters)}>"

    def add_source(self, source: Collector) -> None:
        """Copy what `source` reports too, from the next publish on."""
        self._sources.append(source)

    def publish(self) -> None:
        for source in self._sources:
            for family in source.collect():
                for sample in family.samples:
                    if family.type == "counter":
                        self._count(family.name, family.documentation, sample.labels, sample.value)
                        continue
                    gauge = self._gauge(family.name, family.documentation, sample.labels)
                    (gauge.labels(**sample.labels) if sample.labels else gauge).set(sample.value)

    def _count(self, name: str, documentation: str, labels: dict[str, str], value: float) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = Counter(name, documentation, list(labels), registry=self._registry)
            self._counters[name] = counter
        series = (name, tuple(sorted(labels.items())))
        grown = value - self._counted.get(series, 0.0)
        self._counted[series] = value
        child = counter.labels(**labels) if labels else counter  # a series at 0 exists, as in one process
        if grown > 0:
            child.inc(grown)

    def _gauge(self, name: str, documentation: str, labels: Iterable[str]) -> Gauge:
        gauge = self._gauges.get(name)
        if gauge is None:
            mode = GAUGE_MODES.get(name, "liveall")
            gauge = Gauge(name, documentation, list(labels), registry=self._registry, multiprocess_mode=mode)
            self._gauges[name] = gauge
        return gauge

    def sharing(self) -> Callable[[web.Application], AsyncIterator[None]]:
        """A `cleanup_ctx` that publishes every `PUBLISH_SECONDS` while the app runs."""

        async def publish_while_running(app: web.Application) -> AsyncIterator[None]:
            async def loop() -> None:
                while True:
                    try:
                        self.publish()
                    except Exception:
                        logger.exception("publishing the worker's gauges failed")
                    await asyncio.sleep(PUBLISH_SECONDS)

            task = asyncio.get_running_loop().create_task(loop())
            yield
            task.cancel()

        return publish_while_running
