"""Health of every configured provider: breakers, in-flight counts, and the one seam that feeds them.

Rule of this module: every health decision is made here and fed through one seam, `attempt()`, from
two sources only — real requests (`proxy.py`) and active probes (`probe.py`). A `Slot` maps an outcome
(an answer, an `UpstreamFailure`, a failure after the commit point) onto the provider's `Breaker`
exactly one way for both. Time comes from an injected monotonic clock so tests can drive it. Listeners
hear each healthy⇄unhealthy transition; a listener that raises is logged and ignored.

A reload keeps each provider's record while its upstream stays the same (kind, base_url, key, headers);
an outcome observed by a request still running on an older config is dropped when that provider has
since been repointed or removed (`is_current`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from .. import logfmt
from ..config import HealthSettings, ProviderConfig
from ..providers.base import UpstreamFailure
from ..redact import Redactor
from .breaker import OPENED, Breaker

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Listener = Callable[[str, bool], None]

# Skip reasons decided here rather than by a breaker (`breaker.py` has the others).
UNCONFIGURED = "unconfigured"
SATURATED = "saturated"


def _identity(provider: ProviderConfig) -> tuple[object, ...]:
    """What makes a provider the same upstream across a reload (its health history then still applies)."""
    return (provider.kind, provider.base_url, provider.api_key, tuple(sorted(provider.headers.items())))


class ProviderHealth:
    """Mutable health record of one provider."""

    __slots__ = ("breaker", "in_flight", "last_latency", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.breaker = Breaker()
        self.in_flight = 0
        self.last_latency: float | None = None

    def __repr__(self) -> str:
        breaker = self.breaker
        state = "healthy" if breaker.healthy else "unhealthy"
        return (
            f"<ProviderHealth {self.name} {state} failures={breaker.consecutive_failures} "
            f"in_flight={self.in_flight} last_error={breaker.last_error!r}>"
        )


class Slot:
    """One request's (or probe's) claim on a provider, and the way its outcome reaches the breaker.

    Outcomes of a request that started on a config whose provider has since been repointed or removed
    are dropped: they are about an upstream the config no longer names.
    """

    __slots__ = ("_probe", "_provider", "_tracker")

    def __init__(self, tracker: HealthTracker, provider: ProviderConfig, *, probe: bool) -> None:
        self._tracker = tracker
        self._provider = provider
        self._probe = probe

    def __repr__(self) -> str:
        return f"<Slot {self._provider.name}{' probe' if self._probe else ''}>"

    def succeeded(self, latency: float | None = None) -> None:
        """The provider answered (a request: its first byte or whole answer; a probe: its check)."""
        if self._tracker.is_current(self._provider):
            self._tracker.succeeded(self._provider.name, latency, probe=self._probe)

    def failed(self, failure: UpstreamFailure) -> None:
        """The provider failed before anything reached the client: the one failure → health mapping."""
        tracker = self._tracker
        if not tracker.is_current(self._provider):
            return
        name = self._provider.name
        detail = f"probe: {failure.detail}" if self._probe else failure.detail
        if failure.retry_after is not None:
            tracker.rate_limited(name, failure.retry_after, detail)
        elif failure.provider_fault:
            tracker.failed(name, detail, probe=self._probe)
        elif failure.fallback or self._probe:
            tracker.noted(name, detail)
        # A caller error (400, 422 ...) says nothing about the provider: its record is left alone.

    def failed_after_commit(self, detail: str) -> None:
        """The provider failed mid-stream, after the commit point: a fault like any other."""
        if self._tracker.is_current(self._provider):
            self._tracker.failed(self._provider.name, detail)


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

        A provider whose upstream changed (kind, base_url, key, headers) starts afresh: an operator who
        points a failing provider elsewhere and reloads wants it tried now, not after the old breaker
        window. Its in-flight count carries over, since requests still running on the old config will
        release it.
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
                if not record.breaker.healthy:
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
        """Whether `provider` (from the config a request started with) is the upstream tracked now."""
        return self._identities.get(provider.name) == _identity(provider)

    def names(self) -> list[str]:
        """Names of the providers tracked now (those of the current config)."""
        return list(self._providers)

    def recovery_probes(self) -> tuple[list[str], float | None]:
        """(providers whose breaker wants a recovery probe now, monotonic time of the next one due later)."""
        now = self._clock()
        due = []
        later: float | None = None
        for name, record in self._providers.items():
            breaker = record.breaker
            if breaker.healthy:
                continue
            if breaker.probe_due(now):
                due.append(name)
            elif later is None or breaker.probe_at < later:
                later = breaker.probe_at
        return due, later

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    # -- time --------------------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    def unix(self, monotonic_time: float, now: float | None = None) -> float:
        """A monotonic time of this tracker's clock as unix time."""
        return self._wall_clock() + (monotonic_time - (self._clock() if now is None else now))

    # -- decisions -------------------------------------------------------------------------------
    def skip_reason(self, provider: ProviderConfig) -> str | None:
        """Why this provider must not be tried now, or None when it may be."""
        if not provider.configured:
            return UNCONFIGURED
        record = self.get(provider.name)
        reason = record.breaker.skip_reason(self._clock())
        if reason is not None:
            return reason
        if provider.max_concurrent and record.in_flight >= provider.max_concurrent:
            return SATURATED
        return None

    @contextmanager
    def attempt(self, provider: ProviderConfig, *, probe: bool = False) -> Iterator[Slot]:
        """Claim `provider` for one request (or probe) while the block runs; record its outcome on the slot.

        A request counts as in flight (for `max_concurrent`) until the block exits, however it exits —
        a client that left must not hold a slot. When the breaker is half-open the first request to
        claim it is the trial, and the others skip the provider until it is decided. Probes neither
        count nor claim.
        """
        record = self._providers.get(provider.name)
        trial = 0
        if record is not None and not probe:  # None: removed by a reload that raced this request
            record.in_flight += 1
            trial = record.breaker.claim_trial(self._clock())
        try:
            yield Slot(self, provider, probe=probe)
        finally:
            if record is not None and not probe:
                record.in_flight = max(0, record.in_flight - 1)
                record.breaker.release_trial(trial)

    # -- outcomes (what a Slot records) ------------------------------------------------------------
    def succeeded(self, provider: str, latency: float | None = None, *, probe: bool = False) -> None:
        """A request got its answer (closes the breaker), or a probe passed (closes a half-open one)."""
        record = self.get(provider)
        now = self._clock()
        if latency is not None:
            record.last_latency = latency
        if probe:
            closed, why = record.breaker.probe_succeeded(now, self.settings.backoff_seconds), "a probe succeeded"
        else:
            closed, why = record.breaker.succeeded(now), "a request succeeded"
        if closed:
            logger.warning("provider %s recovered (%s): breaker closed", provider, why)
            self._notify(provider, True)

    def failed(self, provider: str, error: str, *, probe: bool = False) -> None:
        """Count a provider fault (connect error, timeout, 5xx, bad credentials ...)."""
        record = self.get(provider)
        settings = self.settings
        breaker = record.breaker
        change = breaker.failed(
            self._clock(),
            self._redactor.line(error),
            threshold=settings.failure_threshold,
            backoff=settings.backoff_seconds,
            probe=probe,
        )
        if change is None:
            return
        if change == OPENED:
            logger.warning(
                "provider %s unhealthy after %d consecutive failures, out for %gs: %s",
                provider,
                breaker.consecutive_failures,
                settings.backoff_seconds,
                logfmt.value(breaker.last_error),
            )
            self._notify(provider, False)
        else:
            logger.warning(
                "provider %s still failing, out again for %gs: %s",
                provider,
                settings.backoff_seconds,
                logfmt.value(breaker.last_error),
            )

    def rate_limited(self, provider: str, retry_after: float, error: str) -> None:
        """A 429 with Retry-After: keep the provider out for that long, without counting an outage."""
        self.get(provider).breaker.rate_limited(self._clock(), retry_after, self._redactor.line(error))

    def noted(self, provider: str, error: str) -> None:
        """An answer that says nothing about the provider's health (e.g. 404 model not served)."""
        self.get(provider).breaker.noted(self._clock(), self._redactor.line(error))

    def _notify(self, provider: str, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                listener(provider, healthy)
            except Exception:
                logger.exception("health listener %r failed for provider %s", listener, provider)

    # -- reporting -------------------------------------------------------------------------------
    def breaker(self, provider: str) -> str:
        """`closed`, `open` or `half_open`."""
        return self.get(provider).breaker.state(self._clock())

    def status(self, provider: str) -> str:
        """'healthy' or 'unhealthy' (open breaker, or never recovered after one)."""
        return "healthy" if self.get(provider).breaker.is_healthy(self._clock()) else "unhealthy"

    def unavailable_until(self, provider: str) -> float | None:
        """Unix time until which the provider is kept out (breaker or rate limit), if it is."""
        until = self.get(provider).breaker.unavailable_until()
        now = self._clock()
        return round(self.unix(until, now), 3) if until > now else None
