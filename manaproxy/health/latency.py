"""What `hedge_after: auto` learns from, and what a hedge may cost: one target's recent times to first byte,
and one alias's hedge budget.

Rule of this module: pure state, no clock and no I/O; the tracker owns the instances.

The delay must not be something one client steers (issue 14, item 13):
- a sample is an answered attempt of the kind being hedged (streamed and unstreamed are kept apart);
- one client (a hash of its key, never the key) holds at most `CLIENT_SHARE` of the window: past that its
  newest answer replaces its own oldest, so a flood of instant answers from one key cannot pull the delay
  down to hedging everything;
- the estimate is the 95th percentile but at most `MEDIAN_SPREAD` times the median: answers slower than
  that are fewer than half the sample, or they would have moved the median, so a few slow requests cannot
  push the delay up to hedging nothing.
Whatever the delay, `HedgeBudget` bounds what hedging costs: a hedge spends a token that requests earn.
"""

from __future__ import annotations

import math
from collections import deque

TTFB_WINDOW = 200  # answered requests per target and stream kind kept for the `auto` delay
TTFB_MIN_SAMPLES = 20  # fewer, and there is no delay to go by
CLIENT_SHARE = 0.25  # of the window, at most this much from one client key
MEDIAN_SPREAD = 4.0  # the estimate is at most this many times the median

Client = bytes | None  # a hash of the client's key; None when the request presented none


class LatencySample:
    """The last `TTFB_WINDOW` times to first byte of one target and kind, at most `CLIENT_SHARE` of them
    from any one client key."""

    __slots__ = ("_held", "_samples")

    def __init__(self) -> None:
        self._samples: deque[tuple[float, Client]] = deque()
        self._held: dict[bytes, int] = {}  # samples in the window per client key

    def __repr__(self) -> str:
        return f"<LatencySample n={len(self._samples)} clients={len(self._held)}>"

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, seconds: float, client: Client = None) -> None:
        """An answered attempt took `seconds` to its first byte."""
        samples = self._samples
        if client is not None and self._held.get(client, 0) >= int(TTFB_WINDOW * CLIENT_SHARE):
            for index, (_, who) in enumerate(samples):  # the client's own oldest makes room (O(window))
                if who == client:
                    del samples[index]
                    self._release(client)
                    break
        elif len(samples) >= TTFB_WINDOW:
            _, who = samples.popleft()
            if who is not None:
                self._release(who)
        samples.append((seconds, client))
        if client is not None:
            self._held[client] = self._held.get(client, 0) + 1

    def _release(self, client: bytes) -> None:
        left = self._held[client] - 1
        if left:
            self._held[client] = left
        else:
            del self._held[client]

    def estimate(self) -> float | None:
        """The 95th percentile, at most `MEDIAN_SPREAD` × the median; None under `TTFB_MIN_SAMPLES`."""
        if len(self._samples) < TTFB_MIN_SAMPLES:
            return None
        ordered = sorted(seconds for seconds, _ in self._samples)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        median = ordered[len(ordered) // 2]
        return min(p95, MEDIAN_SPREAD * median)


HEDGE_RESERVE_REQUESTS = 10  # the budget holds what this many requests earn (at least one hedge)


class HedgeBudget:
    """At most `percent` % extra upstream attempts for the requests of one alias (a token bucket, as gRPC's
    retry throttling and Envoy's retry budget): each request earns `percent` / 100 of a hedge, up to a
    reserve of what `HEDGE_RESERVE_REQUESTS` requests earn (at least one hedge, none at 0 %); a hedge
    spends one. Over any n requests: at most n × percent / 100 hedges, plus the reserve."""

    __slots__ = ("_capacity", "_earned", "_tokens", "percent")

    def __init__(self, percent: float) -> None:
        self.percent = percent
        # In ten-thousandths of a hedge: whole numbers, so ten requests at 10 % earn exactly one.
        self._earned = round(percent * 100)
        self._capacity = 0 if self._earned <= 0 else max(_HEDGE, self._earned * HEDGE_RESERVE_REQUESTS)
        self._tokens = self._capacity

    def __repr__(self) -> str:
        return f"<HedgeBudget {self.percent:g}% available={self._tokens / _HEDGE:g}>"

    def earn(self) -> None:
        """A request of the alias started."""
        self._tokens = min(self._capacity, self._tokens + self._earned)

    def spend(self) -> bool:
        """Whether one more hedge may start now (and if so, it is paid for)."""
        if self._tokens < _HEDGE:
            return False
        self._tokens -= _HEDGE
        return True

    def refund(self) -> None:
        """The hedge paid for did not start (nothing was left to try)."""
        self._tokens = min(self._capacity, self._tokens + _HEDGE)


_HEDGE = 10_000  # one hedge, in the budget's units
