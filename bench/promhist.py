"""A Prometheus histogram read from `/metrics` text: buckets, sum, count, and quantiles estimated from them.

Quantiles are estimated like PromQL's `histogram_quantile`: find the bucket holding the rank and
interpolate linearly inside it. They are approximate by construction; the mean (sum / count) is exact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LE = re.compile(r'le="([^"]+)"')


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound, with `+Inf` last."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    @classmethod
    def parse(cls, text: str, name: str) -> Histogram:
        """The series `name` (summed over label sets other than `le`) from exposition-format text."""
        hist = cls()
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None:
                continue
            metric, labels, value = match["name"], match["labels"] or "", float(match["value"])
            if metric == f"{name}_bucket":
                le = _LE.search(labels)
                if le is not None:
                    bound = math.inf if le.group(1) == "+Inf" else float(le.group(1))
                    hist.buckets[bound] = hist.buckets.get(bound, 0.0) + value
            elif metric == f"{name}_sum":
                hist.sum += value
            elif metric == f"{name}_count":
                hist.count += value
        return hist

    def __sub__(self, other: Histogram) -> Histogram:
        """The observations made between two scrapes (`after - before`)."""
        return Histogram(
            {bound: count - other.buckets.get(bound, 0.0) for bound, count in self.buckets.items()},
            self.sum - other.sum,
            self.count - other.count,
        )

    def __add__(self, other: Histogram) -> Histogram:
        bounds = set(self.buckets) | set(other.buckets)
        return Histogram(
            {b: self.buckets.get(b, 0.0) + other.buckets.get(b, 0.0) for b in bounds},
            self.sum + other.sum,
            self.count + other.count,
        )

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Estimated q-quantile (0 < q < 1); the largest finite bound when it falls in `+Inf`."""
        if not self.count:
            return math.nan
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound in sorted(self.buckets):
            count = self.buckets[bound]
            if count >= rank:
                if math.isinf(bound):
                    return lower_bound
                if count == lower_count:
                    return bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = bound, count
        return lower_bound

    def summary(self) -> dict[str, float]:
        """count, mean and estimated p50/p90/p99, in microseconds."""
        return {
            "count": self.count,
            "mean_us": self.mean * 1e6,
            "p50_us": self.quantile(0.5) * 1e6,
            "p90_us": self.quantile(0.9) * 1e6,
            "p99_us": self.quantile(0.99) * 1e6,
        }
