"""hostmetrics.SharedState: what scrape-time collectors report, copied into a worker's own metrics.

A gauge is copied as it is; a counter advances by what it grew since the last copy, so that summed over the
workers' files (prometheus_client's multiprocess mode) it counts every event once and never goes backwards.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from manaproxy.hostmetrics import SharedState


class Scripted(Collector):
    """A collector reporting what the test sets."""

    def __init__(self) -> None:
        self.errors: dict[str, float] = {}
        self.size = 0.0

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        size = GaugeMetricFamily("held_bytes", "bytes held")
        size.add_metric([], self.size)
        yield size
        errors = CounterMetricFamily("redis_errors", "errors by feature", labels=["feature"])
        for feature, count in self.errors.items():
            errors.add_metric([feature], count)
        yield errors


def test_counters_advance_by_what_they_grew_and_gauges_are_copied() -> None:
    source, registry = Scripted(), CollectorRegistry()
    shared = SharedState([source], registry)

    source.errors, source.size = {"cache": 2.0}, 100.0
    shared.publish()
    shared.publish()  # nothing grew: nothing counted twice
    assert registry.get_sample_value("redis_errors_total", {"feature": "cache"}) == 2.0
    assert registry.get_sample_value("held_bytes") == 100.0

    source.errors, source.size = {"cache": 5.0, "limits": 1.0}, 40.0
    shared.publish()
    assert registry.get_sample_value("redis_errors_total", {"feature": "cache"}) == 5.0
    assert registry.get_sample_value("redis_errors_total", {"feature": "limits"}) == 1.0
    assert registry.get_sample_value("held_bytes") == 40.0
    assert "counters=['redis_errors']" in repr(shared)


def test_a_source_added_later_is_copied_from_the_next_publish_on() -> None:
    registry = CollectorRegistry()
    shared = SharedState([], registry)
    shared.publish()
    source = Scripted()
    source.errors = {"health": 3.0, "cache": 0.0}
    shared.add_source(source)
    shared.publish()
    assert registry.get_sample_value("redis_errors_total", {"feature": "health"}) == 3.0
    assert registry.get_sample_value("redis_errors_total", {"feature": "cache"}) == 0.0  # at 0, as in one process
