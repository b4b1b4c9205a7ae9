"""The circuit breaker of one upstream, and its Retry-After window.

Rule of this module: pure state and transitions. Time comes in as an argument, so every transition is
table-tested; what a transition means for logs, listeners and metrics is the tracker's business.

Breaker (closed → open → half-open):
- closed: requests go; `failure_threshold` consecutive failures open it for `backoff_seconds`.
- open: the upstream is skipped, and probed on a short, growing interval (1 s, 2 s, 4 s … up to the
  backoff, `probe_at`): the first probe that succeeds closes the breaker, so an upstream back after a
  one-second restart is used again within about a second, not after the whole window. A failure does
  not stretch the window. A real request that succeeds (one sent before the breaker opened) closes it
  too: that is proof enough.
- half-open (the window has ended): one trial may go — the next real request or probe decides.
  Success closes the breaker, failure re-opens it at once. While a trial request is in flight the
  others skip the upstream (`half_open`), so a recovering upstream is not hit by a whole burst.
Against flapping (`GET /models` answers while completions fail, so probes close what requests open
again): each close by a probe doubles the next outage's first probe delay; a real request's success
resets it.
A model's breakers (one per kind of request, `kinds.py`) also let a real request through as the trial at
each of those times (`trials`): a model has no probe of its own, and a trial that fails doubles the wait.
A lone chain entry's request (`anytime`: there is nothing else to try) is the trial of any breaker whenever
none is under way: kept out, it could only be answered with an error, while a direct call would have reached
the provider — and an SDK's retries, told to wait for a probe or a trial that fails and doubles its wait,
would take seconds longer than direct. One trial at a time still keeps a burst off a failing upstream.

A 429 is a rate limit, never an outage: it keeps the upstream out (`rate_limited_until`) for the provider's
hint, or without one for a short default that doubles from 1 s to 30 s and a success resets.

`retry_at` is when the upstream will really be tried again — the next recovery probe or trial, or the end of
a rate limit — which is what every `Retry-After` manaproxy writes says (not the end of a window that a probe
may cut short).
"""

from __future__ import annotations

# Why an upstream is skipped (`HALF_OPEN` is also the state's name): words of the failure taxonomy.
from ..failures import HALF_OPEN, RATE_LIMITED, UNHEALTHY, SkipReason

# Breaker states, as `/v1/health` shows them (and `HALF_OPEN`).
CLOSED = "closed"
OPEN = "open"

# What a failure did to the breaker.
OPENED = "opened"
REOPENED = "reopened"

FIRST_PROBE_DELAY = 1.0  # seconds from opening to the first recovery probe
# A 429 without a hint keeps the upstream out this long, doubling on each such 429 up to the maximum.
FIRST_RATE_LIMIT_DELAY = 1.0
MAX_RATE_LIMIT_DELAY = 30.0


class Breaker:
    """Failure count, open window, half-open trial and rate-limit window of one upstream."""

    __slots__ = (
        "consecutive_failures",
        "healthy",
        "key_refused",
        "last_check",
        "last_error",
        "probe_at",
        "probe_delay",
        "rate_limit_delay",
        "rate_limited_until",
        "since",
        "trial",
        "trial_in_flight",
        "trials",
        "unhealthy_until",
    )

    def __init__(self, *, trials: bool = False) -> None:
        # While open, a real request may be the trial at each probe time (a model's breaker: no probe of its own).
        self.trials = trials
        self.healthy = True  # closed; False from opening until a success closes it again
        self.key_refused = False  # open because our key was refused: no lone request goes (`anytime`)
        self.consecutive_failures = 0
        self.unhealthy_until = 0.0  # monotonic; > now means open
        self.rate_limited_until = 0.0  # monotonic
        self.trial_in_flight = False  # the one half-open trial request is under way
        self.trial = 0  # number of the latest trial, so a stale trial's release clears nothing
        self.last_error: str | None = None
        self.last_check: float | None = None  # monotonic
        self.probe_delay = FIRST_PROBE_DELAY  # from (re)opening to the next recovery probe
        self.probe_at = 0.0  # monotonic time of the next recovery probe while not closed
        self.rate_limit_delay = FIRST_RATE_LIMIT_DELAY  # how long the next 429 without a hint keeps it out
        self.since: float | None = None  # monotonic: it last opened, closed or began a rate-limit window

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        return f"<Breaker {state} failures={self.consecutive_failures} last_error={self.last_error!r}>"

    # -- decisions -------------------------------------------------------------------------------
    def skip_reason(self, now: float, *, anytime: bool = False) -> SkipReason | None:
        """Why the upstream must not be tried now, or None. `anytime`: for a lone chain entry's request, which
        may be the trial whenever none is under way (`_trial_due`)."""
        if self.unhealthy_until > now and not self._trial_due(now, anytime):
            return UNHEALTHY
        if self.rate_limited_until > now:
            return RATE_LIMITED
        if not self.healthy and self.trial_in_flight:
            return HALF_OPEN  # one request is already deciding; do not pile onto a suspect upstream
        return None

    def state(self, now: float) -> str:
        """`closed`, `open` (inside the backoff window) or `half_open` (window over, next outcome decides)."""
        if self.healthy:
            return CLOSED
        return OPEN if self.unhealthy_until > now else HALF_OPEN

    def is_healthy(self, now: float) -> bool:
        """Closed and not inside a window."""
        return self.healthy and self.unhealthy_until <= now

    def probe_due(self, now: float) -> bool:
        """Whether a recovery probe is due (the breaker is not closed and its probe time has come)."""
        return not self.healthy and self.probe_at <= now

    def _trial_due(self, now: float, anytime: bool = False) -> bool:
        """Open, its trial not under way, and either `anytime` (a lone entry's request; not while our key is
        refused: that request could only be refused too) or `scheduled`."""
        if self.healthy or self.trial_in_flight:
            return False
        return (anytime and not self.key_refused) or (self.trials and self.probe_at <= now)

    def scheduled(self, now: float) -> bool:
        """A trial starting now would be one of the breaker's own (its window is over, or, with `trials`, its
        next trial time has come) rather than a lone request's (`anytime`): only a failure of one of these
        makes the next wait twice as long (a lone entry's retries must not push back every other chain's)."""
        return self.unhealthy_until <= now or (self.trials and self.probe_at <= now)

    def unavailable_until(self) -> float:
        """Monotonic time until which the upstream is kept out (breaker or rate limit); 0 when it is not."""
        return max(self.unhealthy_until, self.rate_limited_until)

    def retry_at(self, now: float, *, anytime: bool = False) -> float:
        """Monotonic time at which the upstream will really be tried again (the next recovery probe or trial
        request, or the end of a rate limit); 0 when it is not kept out. `anytime`: as `skip_reason`'s (the
        next such request after the trial under way is a trial)."""
        at = self.rate_limited_until if self.rate_limited_until > now else 0.0
        if anytime and not self.healthy and not self.key_refused:
            # Kept out only while the trial under way decides: ask again in a second, as after an opening.
            at = max(at, now + FIRST_PROBE_DELAY)
        elif self.unhealthy_until > now:  # a probe (or trial) comes before the window's end
            at = max(at, min(self.probe_at, self.unhealthy_until), now)
        elif not self.healthy and self.trial_in_flight:
            at = max(at, now)  # a trial is deciding right now
        return at

    # -- trials ----------------------------------------------------------------------------------
    def claim_trial(self, now: float, *, anytime: bool = False) -> int:
        """A trial number (> 0) when a request starting now is the half-open trial, else 0 (`anytime`: as
        `skip_reason`'s)."""
        if (
            not self.healthy
            and not self.trial_in_flight
            and (self.unhealthy_until <= now or self._trial_due(now, anytime))
        ):
            self.trial += 1
            self.trial_in_flight = True
            return self.trial
        return 0

    def release_trial(self, trial: int) -> None:
        """The request that claimed `trial` ended (a stale trial's release changes nothing)."""
        if trial and trial == self.trial:
            self.trial_in_flight = False

    # -- outcomes --------------------------------------------------------------------------------
    def succeeded(self, now: float) -> bool:
        """A real request got its answer: closes the breaker whatever its state. True if it was open."""
        self.last_check = now
        self.probe_delay = FIRST_PROBE_DELAY
        self.rate_limit_delay = FIRST_RATE_LIMIT_DELAY
        return self._close(now)

    def probe_succeeded(self, now: float, backoff: float) -> bool:
        """A probe succeeded: closes a breaker that is not closed. True if it closed it."""
        self.last_check = now
        if self.healthy:
            # `/models` answering says nothing of the completions that failed: the count stands.
            return False
        self.probe_delay = min(self.probe_delay * 2, backoff)  # until a real request succeeds
        return self._close(now)

    def _close(self, now: float) -> bool:
        self.consecutive_failures = 0
        self.unhealthy_until = 0.0
        self.trial_in_flight = False  # decided (a streamed trial may run on; it holds no claim)
        self.key_refused = False
        recovered = not self.healthy
        if recovered:
            self.since = now
        self.healthy = True
        return recovered

    def failed(
        self, now: float, error: str, *, threshold: int, backoff: float, probe: bool = False, key_refused: bool = False
    ) -> str | None:
        """Count a fault. Returns `opened` or `reopened` when it (re)opened the breaker, else None. `probe`: the
        failure is a recovery probe's or a trial request's (the next one then waits twice as long);
        `key_refused`: our key was refused (until it closes, no lone request is let through either)."""
        self.last_check = now
        self.key_refused = self.key_refused or key_refused
        self.last_error = error
        self.consecutive_failures += 1
        if not self.healthy:
            if probe:  # still down: the next recovery probe waits twice as long
                self.probe_delay = min(self.probe_delay * 2, backoff)
                self.probe_at = now + self.probe_delay
            # Inside the window (a probe, or a request started before the breaker opened) a failure
            # changes nothing more: the window is not stretched, so recovery is noticed once it ends.
            # After it (half-open) the failure decides: out again for a whole window.
            if self.unhealthy_until > now:
                return None
            self._open(now, backoff)
            self.trial_in_flight = False  # decided: the next window ends in a new trial
            return REOPENED
        if self.consecutive_failures < threshold:
            return None
        self._open(now, backoff)
        self.healthy = False
        self.since = now
        return OPENED

    def _open(self, now: float, backoff: float) -> None:
        self.unhealthy_until = now + backoff
        self.probe_at = now + min(self.probe_delay, backoff)

    def rate_limited(self, now: float, seconds: float | None, error: str) -> None:
        """A 429: out for `seconds` (the provider's hint), or without one for the growing default; never
        counted as an outage."""
        self.last_check = now
        self.last_error = error
        if self.rate_limited_until <= now and self.healthy:
            self.since = now
        if seconds is None:
            seconds = self.rate_limit_delay
            self.rate_limit_delay = min(self.rate_limit_delay * 2, MAX_RATE_LIMIT_DELAY)
        self.rate_limited_until = max(self.rate_limited_until, now + seconds)

    def noted(self, now: float, error: str) -> None:
        """An answer that says nothing about the upstream's health (e.g. 404 model not served)."""
        self.last_check = now
        self.last_error = error

    # -- news from other processes (`news.py`) ---------------------------------------------------------
    def heard_down(self, now: float, seconds: float, error: str) -> bool:
        """Another process saw the upstream go down: a closed breaker opens for `seconds`, probed (or tried)
        on the same growing interval as after an opening of its own. One already open is left as it is: what
        this process saw itself wins. True if it opened."""
        if not self.healthy:
            return False
        self.last_error = error
        self._open(now, seconds)
        self.healthy = False
        self.since = now
        return True

    def heard_up(self, now: float) -> bool:
        """Another process saw the upstream answer again: closes the breaker. True if it was open."""
        return self._close(now)
