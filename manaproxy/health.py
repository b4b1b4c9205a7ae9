"""Per-provider health: circuit breaker, rate-limit windows, in-flight counts, transition listeners.

Rule of this module: every health decision lives here and is fed from two sources only — the outcome
of real requests (`proxy.py`) and active probes (`probe.py`). Time comes from an injected monotonic
clock so tests can drive it. Listeners hear each healthy⇄unhealthy transition; a listener that raises
is logged and ignored, never allowed to break the state machine.

Breaker (closed → open → half-open):
- closed: requests go; `failure_threshold` consecutive failures open it for `backoff_seconds`.
- open: the provider is skipped for the whole window. A probe success does not close it early
  (`GET /models` answering says little about completions failing; closing on it would make the
  breaker flap with every probe), and a failure does not stretch it. A real request that succeeds
  (one sent before the breaker opened) does close it: that is proof enough.
- half-open (the window has ended): one trial may go — the next real request or probe decides.
  Success closes the breaker, failure re-opens it at once. While a trial request is in flight the
  others skip the provider (`half_open`), so a recovering provider is not hit by a whole burst.
A 429 with `Retry-After` keeps the provider out for that long without counting as an outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from . import logfmt
from .config import HealthSettings, ProviderConfig
from .redact import Redactor

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Listener = Callable[[str, bool], None]

# Skip reasons: short stable words, also used as fallback metric `reason` values.
UNCONFIGURED = "unconfigured"
UNHEALTHY = "unhealthy"
RATE_LIMITED = "rate_limited"
SATURATED = "saturated"
HALF_OPEN = "half_open"  # the breaker's window is over and a trial request is deciding

# Breaker states, as `/v1/health` shows them.
CLOSED = "closed"
OPEN = "open"


def _identity(provider: ProviderConfig) -> tuple[object, ...]:
    """What makes a provider the same upstream across a reload (its health history then still applies)."""
    return (provider.kind, provider.base_url, provider.api_key, tuple(sorted(provider.headers.items())))


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
        "trial",
        "trial_in_flight",
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
        self.trial_in_flight = False  # the one half-open trial request is under way
        self.trial = 0  # number of the latest trial, so a stale trial's release clears nothing

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
        providers: Mapping[str, ProviderConfig],
        *,
        redactor: Redactor | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        # The application's one redactor (it learns each reloaded config's keys); last errors go through it.
        self._redactor = redactor if redactor is not None else Redactor(providers.values())
        self._clock = clock
        self._wall_clock = wall_clock
        self._providers: dict[str, ProviderHealth] = {name: ProviderHealth(name) for name in providers}
        self._identities = {name: _identity(spec) for name, spec in providers.items()}
        self._listeners: list[Listener] = []

    def __repr__(self) -> str:
        return f"<HealthTracker {list(self._providers.values())!r}>"

    # -- configuration ----------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call `listener(provider, healthy)` on every transition."""
        self._listeners.append(listener)

    def reconfigure(self, settings: HealthSettings, providers: Mapping[str, ProviderConfig]) -> None:
        """After a reload: keep state of providers that still exist, add new ones, drop removed ones.

        A provider whose upstream changed (kind, base_url, key, headers) starts afresh: an operator who points a failing provider elsewhere and reloads
        wants it tried now, not after the old breaker window. Its in-flight count carries over, since
        requests still running on the old config will release it.
        """
        self.settings = settings
        identities = {name: _identity(spec) for name, spec in providers.items()}
        previous = self._providers
        fresh: dict[str, ProviderHealth] = {}
        recovered: list[str] = []
        for name, identity in identities.items():
            record = previous.get(name)
            if record is not None and self._identities.get(name) != identity:
                logger.info("provider %s changed upstream: health state reset", name)
                if not record.healthy:
                    recovered.append(name)
                in_flight = record.in_flight
                record = ProviderHealth(name)
                record.in_flight = in_flight
            fresh[name] = record or ProviderHealth(name)
        self._providers = fresh
        self._identities = identities
        for name in recovered:
            self._notify(name, True)

    def get(self, provider: str) -> ProviderHealth:
        """The provider's record; a detached blank one for a provider the current config does not declare
        (an outcome recorded there, by a request still running on an old config, changes nothing)."""
        record = self._providers.get(provider)
        return record if record is not None else ProviderHealth(provider)

    def is_current(self, provider: ProviderConfig) -> bool:
        """Whether `provider` (from the config a request started with) is the upstream tracked now.

        After a reload repointed or removed it, a request still running on the old config must not
        record its outcome against the new upstream's clean record.
        """
        return self._identities.get(provider.name) == _identity(provider)

    def names(self) -> list[str]:
        """Names of the providers tracked now (those of the current config)."""
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
        if not record.healthy and record.trial_in_flight:
            return HALF_OPEN  # one request is already deciding; do not pile onto a suspect provider
        if provider.max_concurrent and record.in_flight >= provider.max_concurrent:
            return SATURATED
        return None

    def breaker(self, provider: str) -> str:
        """`closed`, `open` (inside the backoff window) or `half_open` (window over, next outcome decides)."""
        return _breaker_state(self.get(provider), self._clock())

    def unavailable_until(self, provider: str) -> float | None:
        """Unix time until which the provider is kept out (breaker or rate limit), if it is."""
        record = self.get(provider)
        until = max(record.unhealthy_until, record.rate_limited_until)
        now = self._clock()
        return round(self._to_unix(until, now), 3) if until > now else None

    # -- outcomes --------------------------------------------------------------------------------
    def acquire(self, provider: str) -> int:
        """A request to `provider` starts (counted until `release`).

        Returns a trial number (> 0) when this request is the half-open trial: the breaker's window is
        over and no other trial is under way; else 0. Requests that were already in flight when the
        breaker opened are not trials.
        """
        record = self._providers.get(provider)
        if record is None:  # removed by a reload that raced this request
            return 0
        record.in_flight += 1
        if not record.healthy and not record.trial_in_flight and record.unhealthy_until <= self._clock():
            record.trial += 1
            record.trial_in_flight = True
            return record.trial
        return 0

    def release(self, provider: str, *, trial: int = 0) -> None:
        """A request to `provider` ends, whatever its outcome (`trial`: what `acquire` returned)."""
        record = self._providers.get(provider)
        if record is None:  # removed by a reload while the request ran
            return
        record.in_flight = max(0, record.in_flight - 1)
        if trial and trial == record.trial:
            record.trial_in_flight = False

    def record_success(self, provider: str, latency: float | None = None) -> None:
        """A real request got its answer from `provider`: closes the breaker whatever its state."""
        record = self.get(provider)
        record.last_check = self._clock()
        if latency is not None:
            record.last_latency = latency
        self._close(record, "a request succeeded")

    def record_probe_success(self, provider: str) -> None:
        """A probe succeeded: closes a half-open breaker, but not an open one (see the module rule)."""
        record = self.get(provider)
        now = self._clock()
        record.last_check = now
        if record.healthy or record.unhealthy_until > now:
            # Closed: `/models` answering says nothing of the completions that failed, so the count of
            # consecutive request failures stands. Open: the window runs its course.
            return
        self._close(record, "a probe succeeded")

    def _close(self, record: ProviderHealth, why: str) -> None:
        record.consecutive_failures = 0
        record.unhealthy_until = 0.0
        record.trial_in_flight = False  # decided (a streamed trial may run on; it holds no claim)
        if not record.healthy:
            record.healthy = True
            logger.warning("provider %s recovered (%s): breaker closed", record.name, why)
            self._notify(record.name, True)

    def record_failure(self, provider: str, error: str) -> None:
        """Count a provider fault (connect error, timeout, 5xx, bad credentials ...)."""
        record = self.get(provider)
        now = self._clock()
        record.last_check = now
        record.last_error = self._redactor.line(error)
        record.consecutive_failures += 1
        if not record.healthy:
            # Inside the window (a probe, or a request started before the breaker opened) a failure
            # changes nothing: the window is not stretched, so recovery is noticed once it ends.
            # After it (half-open) the failure decides: out again for a whole window.
            if record.unhealthy_until <= now:
                record.unhealthy_until = now + self.settings.backoff_seconds
                record.trial_in_flight = False  # decided: the next window ends in a new trial
                logger.warning(
                    "provider %s still failing, out again for %gs: %s",
                    provider,
                    self.settings.backoff_seconds,
                    logfmt.value(record.last_error),
                )
        elif record.consecutive_failures >= self.settings.failure_threshold:
            record.unhealthy_until = now + self.settings.backoff_seconds
            record.healthy = False
            logger.warning(
                "provider %s unhealthy after %d consecutive failures, out for %gs: %s",
                provider,
                record.consecutive_failures,
                self.settings.backoff_seconds,
                logfmt.value(record.last_error),
            )
            self._notify(provider, False)

    def record_rate_limited(self, provider: str, retry_after: float, error: str) -> None:
        """A 429 with Retry-After: keep the provider out for that long, without counting an outage."""
        record = self.get(provider)
        now = self._clock()
        record.last_check = now
        record.last_error = self._redactor.line(error)
        record.rate_limited_until = max(record.rate_limited_until, now + retry_after)

    def record_neutral(self, provider: str, error: str) -> None:
        """An answer that says nothing about the provider's health (e.g. 404 model not served)."""
        record = self.get(provider)
        record.last_check = self._clock()
        record.last_error = self._redactor.line(error)

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
                "breaker": _breaker_state(record, now),
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


def _breaker_state(record: ProviderHealth, now: float) -> str:
    if record.healthy:
        return CLOSED
    return OPEN if record.unhealthy_until > now else HALF_OPEN
