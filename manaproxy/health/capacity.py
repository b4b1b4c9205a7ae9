"""`max_concurrent: auto`: how many requests one target may have in flight, learned from how long it takes
to start answering.

Rule of this module: pure state, no clock and no I/O; the tracker owns one `Capacity` per target and hands
it the time (its injected clock) with every call.

A local GPU server (Ollama with `OLLAMA_NUM_PARALLEL=K`, vLLM, llama.cpp) answers K requests at once and
queues the rest: the queued one waits for a whole answer before its first byte. So the signal is the time
to the first byte (streamed), or to the answer per output token (unstreamed, when its usage says how many;
the whole time when it does not), compared with the target's *floor*: its best time of the last
`FLOOR_WINDOW`..2×`FLOOR_WINDOW` seconds, re-measured from the answers themselves (the best of a window is
an answer that did not queue). Each signal has its own floor: their units differ.

- **Queued** (a sample above `TOLERANCE` × floor + `SLACK`): the limit shrinks by one, or by a quarter when
  that is more (`BACKOFF`, Envoy's bounded multiplicative decrease) — at most once per round trip: only a request started after the last decrease
  can cause the next (TCP's one reduction per window), so the burst already queued behind a too-high limit
  counts once. The limit it shrank from becomes the *ceiling*. A slow sample of a request that had the
  target to itself (nothing else of ours in flight) did not queue behind ours: a long prompt, another user
  of the GPU or a stall of our own made it slow, and it teaches nothing (without this, one such sample at
  the start would hold the limit at 1 for `PROBE_HOLD`).
- **Not queued, at the limit** (the request was started with the limit's worth in flight): the limit grows
  by 1/limit (one per limit's worth of such answers, TCP's additive increase). Answers that did not reach
  the limit say nothing about it ("app limited" in Netflix's words): a quiet target keeps its limit.
- The ceiling is approached freely but only re-tried after `PROBE_HOLD` seconds without queueing: going
  past a known capacity costs a request a whole answer's wait, so it is done rarely; a target that got
  faster again (another process let go of the GPU) is found within that time.
- Bounds: never under `min_concurrent` (default 1: a failing target keeps a slot, so it is tried again once
  its breaker lets it — the breaker handles failure, the limiter handles load; failures teach it nothing)
  and never over `max_concurrent_limit` (default 64). It starts at `min_concurrent`: a target is loaded
  from below, so learning never queues a burst on it.

From Envoy's adaptive concurrency filter (gradient controller) it takes the comparison of a sample with a
periodically re-measured minimum, the bounded multiplicative decrease and the min/max bounds; from Vegas
(Netflix concurrency-limits) the additive growth only while no queue forms and only when the limit is the
bottleneck. Unlike both it reads time to first byte (an answer's total time grows with its length), keeps
a ceiling to probe past rarely (an LLM's queue costs seconds, an RPC's milliseconds), and re-measures its
floor from the answers rather than by pinning the limit down (spilling to the cloud has a price).
"""

from __future__ import annotations

import math

from ..config import AutoConcurrency

TOLERANCE = 2.0  # a sample up to this many times the floor did not queue (prompt length moves it too)
SLACK = 0.05  # seconds added to the tolerance: timer and scheduling noise on a fast floor
BACKOFF = 0.75  # a decrease keeps at most this share of the limit (and drops at least one)
FLOOR_WINDOW = 10.0  # seconds; the floor is the best sample of this window and the one before it
PROBE_HOLD = 30.0  # seconds without queueing before the ceiling is tried again

# The signals a target is timed by; each has its own floor.
TTFB = "ttfb"  # streamed: seconds to the first event
PER_TOKEN = "per_token"  # unstreamed with usage: seconds to the answer per output token
ANSWER = "answer"  # unstreamed without usage: seconds to the answer


class _Floor:
    """The best sample of the current window and of the one before it."""

    __slots__ = ("current", "previous", "started")

    def __init__(self, now: float) -> None:
        self.started = now
        self.current = math.inf
        self.previous = math.inf

    def roll(self, now: float) -> None:
        if now - self.started >= 2 * FLOOR_WINDOW:  # nothing seen for two windows: both are stale
            self.previous = self.current = math.inf
            self.started = now
        elif now - self.started >= FLOOR_WINDOW:
            self.previous, self.current = self.current, math.inf
            self.started = now

    def value(self) -> float:
        return min(self.current, self.previous)


class Capacity:
    """The learned concurrency limit of one target."""

    __slots__ = ("_floors", "bounds", "ceiling", "decreased_at", "last", "last_queued_at", "limit")

    def __init__(self, bounds: AutoConcurrency) -> None:
        self.bounds = bounds
        self.limit = float(bounds.min_concurrent)
        self.ceiling: int | None = None  # the limit at which a queue last formed
        self.decreased_at = -math.inf  # when the limit last shrank (a request started before it cannot shrink it)
        self.last_queued_at = -math.inf
        self.last: tuple[str, float] | None = None  # the last sample: (signal, seconds)
        self._floors: dict[str, _Floor] = {}

    def __repr__(self) -> str:
        return f"<Capacity limit={self.limit:.2f} allowed={self.allowed} ceiling={self.ceiling}>"

    @property
    def allowed(self) -> int:
        """Requests that may be in flight at once now."""
        bounds = self.bounds
        return max(bounds.min_concurrent, min(bounds.max_concurrent_limit, int(self.limit)))

    def rebound(self, bounds: AutoConcurrency) -> None:
        """A reload changed the bounds: keep what was learned, within the new ones."""
        self.bounds = bounds
        self.limit = float(min(max(self.limit, bounds.min_concurrent), bounds.max_concurrent_limit))

    def floor(self, signal: str, now: float) -> float | None:
        """The best recent time of `signal` (None: none seen lately)."""
        record = self._floors.get(signal)
        if record is None:
            return None
        record.roll(now)
        value = record.value()
        return None if math.isinf(value) else value

    def view(self, now: float) -> dict[str, object]:
        """What `/v1/health` shows: the limit, and the times it is based on (seconds, by signal)."""
        return {
            "limit": self.allowed,
            "learned": round(self.limit, 2),
            "ceiling": self.ceiling,
            "min_concurrent": self.bounds.min_concurrent,
            "max_concurrent_limit": self.bounds.max_concurrent_limit,
            "floor_seconds": {
                signal: round(value, 4) for signal in self._floors if (value := self.floor(signal, now)) is not None
            },
            "last_seconds": None if self.last is None else {self.last[0]: round(self.last[1], 4)},
        }

    def observe(self, signal: str, seconds: float, *, started: float, concurrency: int, now: float) -> None:
        """An answer of a request started at `started` with `concurrency` requests in flight to the target
        (itself included) took `seconds` by `signal`."""
        self.last = (signal, seconds)
        record = self._floors.get(signal)
        if record is None:
            record = self._floors[signal] = _Floor(now)
        record.roll(now)
        floor = record.value()
        record.current = min(record.current, seconds)
        if math.isinf(floor):
            floor = seconds  # the first sample of a while: it is its own floor
        bounds = self.bounds
        if seconds > TOLERANCE * floor + SLACK:
            if concurrency <= 1:
                return  # it had the target to itself: slow for a reason of its own (a long prompt, another user)
            self.last_queued_at = now
            if started < self.decreased_at:
                return  # sent under the limit before the last decrease: that one has answered for it
            allowed = self.ceiling = self.allowed
            self.limit = float(max(bounds.min_concurrent, min(allowed - 1, math.ceil(allowed * BACKOFF))))
            self.decreased_at = now
            return
        if concurrency < self.allowed:
            return  # the limit was not what held this target back: it says nothing about the limit
        grown = self.limit + 1 / self.allowed
        if self.ceiling is not None and grown >= self.ceiling:
            if now - self.last_queued_at < PROBE_HOLD:
                grown = min(grown, self.ceiling - 1e-9)  # up to just under the ceiling until the hold is over
            else:
                self.ceiling = None  # held long enough without a queue: try past it
        self.limit = min(float(bounds.max_concurrent_limit), max(self.limit, grown))
