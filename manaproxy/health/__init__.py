"""Health: per-provider and per-target breakers (`breaker.py`), learned concurrency limits (`capacity.py`) and
the tracker with its one outcome seam (`tracker.py`). Rule of this package: no I/O and no HTTP; the probe loop
(`manaproxy.probe`) feeds it and the views (`manaproxy.views.health`) read it."""

from ..failures import HALF_OPEN, RATE_LIMITED, SATURATED, UNCONFIGURED, UNHEALTHY
from .breaker import CLOSED, OPEN, Breaker
from .tracker import HealthTracker, ProviderHealth, Slot

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "RATE_LIMITED",
    "SATURATED",
    "UNCONFIGURED",
    "UNHEALTHY",
    "Breaker",
    "HealthTracker",
    "ProviderHealth",
    "Slot",
]
