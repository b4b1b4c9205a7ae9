"""The order in which one request tries its chain: step by step, and within a pool by load.

Rule of this module: it decides only which target comes next, reading health (what is kept out, what is
in flight) and nothing else; sending, racing and committing are the proxy's.
- A step that is one target is tried if health lets it be, else skipped.
- In a pool, of the members not skipped (unconfigured, breaker open, rate-limited, saturated) the one with
  the fewest requests in flight per unit of weight comes first; a tie is broken at random in proportion
  to weight, so that with no load a 3:1 pool sends 75 % / 25 % of its requests. A member that fails is
  followed by the pool's other members (chosen the same way), then by the next step.
Every entry skipped is written to the request record once, with how long it is kept out.

With hedging, when the next target starts is decided here too (`hedge_in`), from numbers the race hands in;
the race itself (starting, cancelling, committing) is the proxy's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .config import Config, Member, Step, Target
from .health import HealthTracker
from .record import Attempt, RequestRecord


class Plan:
    """The targets one request may try, handed out one at a time (`next()`)."""

    __slots__ = ("_config", "_health", "_pool", "_record", "_rng", "_steps")

    def __init__(
        self,
        steps: tuple[Step, ...],
        config: Config,
        health: HealthTracker,
        record: RequestRecord,
        rng: random.Random,
    ) -> None:
        self._steps: Iterator[Step] = iter(steps)
        self._pool: list[Member] = []  # members of the current step not yet handed out nor skipped
        self._config = config
        self._health = health
        self._record = record
        self._rng = rng

    def __repr__(self) -> str:
        return f"<Plan left in step: {[str(member.target) for member in self._pool]}>"

    def next(self) -> Target | None:
        """The next target to try, or None when the chain has run out."""
        while True:
            if not self._pool:
                step = next(self._steps, None)
                if step is None:
                    return None
                self._pool = list(step.members)
            member = self._pick()
            if member is not None:
                return member.target

    def _pick(self) -> Member | None:
        health = self._health
        usable = []
        for member in self._pool:
            target = member.target
            skip = health.skip_reason(self._config.providers[target.provider], target.model)
            if skip is None:
                usable.append(member)
                continue
            wait = health.retry_in(target.provider, target.model)
            self._record.attempts.append(Attempt.skipped(target, skip, wait))
        if not usable:
            self._pool = []
            return None
        chosen = usable[0] if len(usable) == 1 else self._least_loaded(usable)
        usable.remove(chosen)
        self._pool = usable  # the skipped are not looked at again for this request
        return chosen

    def _least_loaded(self, members: list[Member]) -> Member:
        health = self._health
        loads = [health.target(m.target.provider, m.target.model).in_flight / m.weight for m in members]
        least = min(loads)
        tied = [member for member, load in zip(members, loads, strict=True) if load == least]
        if len(tied) == 1:
            return tied[0]
        return self._rng.choices(tied, weights=[member.weight for member in tied])[0]


def hedge_in(
    *, racing: int, max_extra: int, hedging: bool, delay: float | None, youngest: float, now: float
) -> float | None:
    """Seconds the race waits for an answer before it starts the next target beside the `racing` attempts
    in flight: `delay` after the `youngest` of them started (each hedge is timed from the one before it), at
    once when that is past. None — wait for an answer, however long — when no hedge may start: `max_extra`
    attempts already race beside the first, the plan or the hedge budget has run out (`hedging` False), or
    there is no delay to go by (`hedge_after: auto` before it has learned one). An attempt that fails is
    replaced at once while fewer than `1 + max_extra` are racing, as without hedging."""
    if not hedging or racing > max_extra or delay is None:
        return None
    return max(0.0, youngest + delay - now)
