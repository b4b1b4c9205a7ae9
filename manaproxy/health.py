"""Per-provider health: circuit breaker, rate-limit windows, in-flight counts, transition listeners.

Rule of this module: every health decision lives here and is fed from two sources only — the outcome
of real requests (`proxy.py`) and active probes (`probe.py`). Time comes from an injected monotonic
clock so tests can drive it. Listeners hear each healthy⇄unhealthy transition; a listener that raises
is logged and ignored, never allowed to break the state machine.

Breaker: `failure_threshold` consecutive failures open it for `backoff_seconds`; after the window the
provider is half-open — requests may go, and the next outcome decides: success closes it, failure
re-opens it at once. A 429 with `Retry-After` keeps the provider out for that long without counting as
an outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from .config import HealthSettings, ProviderConfig

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Listener = Callable[[str, bool], None]

# Skip reasons: short stable words, also used as fallback metric `reason` values.
UNCONFIGURED = "unconfigured"
UNHEALTHY = "unhealthy"
RATE_LIMITED = "rate_limited"
SATURATED = "saturated"

_MAX_ERROR_LEN = 200


def _sanitize(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_LEN else text[: _MAX_ERROR_LEN - 3] + "..."


class ProviderHealth:
    """Mutable health record of one provider."""

    __slots__ = (
        "consecutive_failures",
        "healthy",
        "in_flight",
        "last_check",
        "last_error",
        "last_latency",
        "name",
        "rate_limited_until",
        "unhealthy_until",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_check: float | None = None  # monotonic
        self.unhealthy_until = 0.0  # monotonic; > now means the breaker is open
        self.rate_limited_until = 0.0  # monotonic
        self.in_flight = 0
        self.last_latency: float | None = None

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        return (
            f"<ProviderHealth {self.name} {state} failures={self.consecutive_failures} "
            f"in_flight={self.in_flight} last_error={self.last_error!r}>"
        )


class HealthTracker:
    """Health state of every configured provider."""

    def __init__(
        self,
        settings: HealthSettings,
        providers: Iterable[str],
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._wall_clock = wall_clock
        self._providers: dict[str, ProviderHealth] = {name: ProviderHealth(name) for name in providers}
        self._listeners: list[Listener] = []

    def __repr__(self) -> str:
        return f"<HealthTracker {list(self._providers.values())!r}>"

    # -- configuration ----------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call `listener(provider, healthy)` on every transition."""
        self._listeners.append(listener)

    def reconfigure(self, settings: HealthSettings, providers: Iterable[str]) -> None:
        """After a reload: keep state of providers that still exist, add new ones, drop removed ones."""
        self.settings = settings
        names = list(providers)
        self._providers = {name: self._providers.get(name) or ProviderHealth(name) for name in names}

    def get(self, provider: str) -> ProviderHealth:
        record = self._providers.get(provider)
        if record is None:  # a provider added by a reload that raced a request
            record = self._providers[provider] = ProviderHealth(provider)
        return record

    def names(self) -> list[str]:
        return list(self._providers)

    # -- decisions -------------------------------------------------------------------------------
    def skip_reason(self, provider: ProviderConfig) -> str | None:
        """Why this provider must not be tried now, or None when it may be."""
        if not provider.configured:
            return UNCONFIGURED
        record = self.get(provider.name)
        now = self._clock()
        if record.unhealthy_until > now:
            return UNHEALTHY
        if record.rate_limited_until > now:
            return RATE_LIMITED
        if provider.max_concurrent and record.in_flight >= provider.max_concurrent:
            return SATURATED
        return None

    def unavailable_until(self, provider: str) -> float | None:
        """Unix time until which the provider is kept out (breaker or rate limit), if it is."""
        record = self.get(provider)
        until = max(record.unhealthy_until, record.rate_limited_until)
        now = self._clock()
        return self._to_unix(until, now) if until > now else None

    # -- outcomes --------------------------------------------------------------------------------
    def acquire(self, provider: str) -> None:
        self.get(provider).in_flight += 1

    def release(self, provider: str) -> None:
        record = self.get(provider)
        record.in_flight = max(0, record.in_flight - 1)

    def record_success(self, provider: str, latency: float | None = None) -> None:
        record = self.get(provider)
        record.last_check = self._clock()
        record.consecutive_failures = 0
        record.unhealthy_until = 0.0
        if latency is not None:
            record.last_latency = latency
        if not record.healthy:
            record.healthy = True
            logger.warning("provider %s recovered: breaker closed", provider)
            self._notify(provider, True)

    def record_failure(self, provider: str, error: str) -> None:
        """Count a provider fault (connect error, timeout, 5xx, bad credentials ...)."""
        record = self.get(provider)
        now = self._clock()
        record.last_check = now
        record.last_error = _sanitize(error)
        record.consecutive_failures += 1
        half_open = not record.healthy
        if half_open or record.consecutive_failures >= self.settings.failure_threshold:
            record.unhealthy_until = now + self.settings.backoff_seconds
            if record.healthy:
                record.healthy = False
                logger.warning(
                    "provider %s unhealthy after %d consecutive failures, out for %gs: %s",
                    provider,
                    record.consecutive_failures,
                    self.settings.backoff_seconds,
                    record.last_error,
                )
                self._notify(provider, False)

    def record_rate_limited(self, provider: str, retry_after: float, error: str) -> None:
        """A 429 with Retry-After: keep the provider out for that long, without counting an outage."""
        record = self.get(provider)
        now = self._clock()
        record.last_check = now
        record.last_error = _sanitize(error)
        record.rate_limited_until = max(record.rate_limited_until, now + retry_after)

    def record_neutral(self, provider: str, error: str) -> None:
        """An answer that says nothing about the provider's health (e.g. 404 model not served)."""
        record = self.get(provider)
        record.last_check = self._clock()
        record.last_error = _sanitize(error)

    def _notify(self, provider: str, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                listener(provider, healthy)
            except Exception:
                logger.exception("health listener %r failed for provider %s", listener, provider)

    # -- reporting -------------------------------------------------------------------------------
    def _to_unix(self, monotonic_time: float, now: float) -> float:
        return self._wall_clock() + (monotonic_time - now)

    def status(self, provider: str) -> str:
        """'healthy' or 'unhealthy' (open breaker, or never recovered after one)."""
        record = self.get(provider)
        return "healthy" if record.healthy and record.unhealthy_until <= self._clock() else "unhealthy"

    def snapshot(self, providers: Iterable[ProviderConfig]) -> dict[str, dict[str, object]]:
        """Per-provider view for `/v1/health`; contains no secrets."""
        now = self._clock()
        view: dict[str, dict[str, object]] = {}
        for provider in providers:
            record = self.get(provider.name)
            until = max(record.unhealthy_until, record.rate_limited_until)
            if not provider.configured:
                status = UNCONFIGURED
            elif not record.healthy or record.unhealthy_until > now:
                status = "unhealthy"
            elif record.rate_limited_until > now:
                status = RATE_LIMITED
            else:
                status = "healthy"
            view[provider.name] = {
                "status": status,
                "kind": provider.kind,
                "configured": provider.configured,
                "consecutive_failures": record.consecutive_failures,
                "last_error": record.last_error,
                "last_check_unix": None
                if record.last_check is None
                else round(self._to_unix(record.last_check, now), 3),
                "unhealthy_until_unix": round(self._to_unix(until, now), 3) if until > now else None,
                "in_flight": record.in_flight,
                "max_concurrent": provider.max_concurrent,
                "last_latency_seconds": None if record.last_latency is None else round(record.last_latency, 4),
            }
        return view
