"""Health: per-provider breakers (`breaker.py`), the tracker and its one outcome seam (`tracker.py`), active
probes (`probe.py`) and the `/health` and `/v1/health` views (`views.py`)."""

from .breaker import CLOSED, HALF_OPEN, OPEN, RATE_LIMITED, UNHEALTHY, Breaker
from .tracker import SATURATED, UNCONFIGURED, HealthTracker, ProviderHealth, Slot

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
