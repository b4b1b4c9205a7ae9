"""The order in which one request tries its chain: step by step, and within a pool by load.

Rule of this module: it decides only which target comes next, reading health (what is kept out, what is
in flight) and nothing else; sending, racing and committing are the proxy's.
- A step that is one target is tried if health lets it be, else skipped.
- In a pool, of the members not skipped (unconfigured, breaker open, rate-limited, saturated: its provider's
  `max_concurrent`, or the member's own, fixed or learned) the one with
  the fewest requests in flight per unit of weight comes first; a tie is broken at random in proportion
  to weight, so that with no load a 3:1 pool sends 75 % / 25 % of its requests. A member that fails is
  followed by the pool's other members (chosen the same way), then by the next step.
- An entry kept out only by a rate limit is skipped while another entry can be tried: once the rest of the
  chain has been tried or skipped, the one whose limit ends first is tried anyway (as a direct call would
  be), so a lone entry's 429 reaches the client as the provider's own, with its headers, on every try.
  But while an entry was skipped as saturated, the rate-limited entry is held back (`held()`): the request
  first waits for a place at the saturated one (freed in seconds), and calls the entry that said when it
  will be back (and would likely answer 429 again, lengthening its window) only once that wait is over.
- An entry kept out only by news from other processes (`health: {shared: true}`, `HealthTracker.heard_only`)
  is skipped too, but once the rest of the chain has been tried or skipped it is tried after all, in chain
  order and before an entry kept out by a rate limit: news makes an entry skipped sooner, never a request
  fail that local health alone would serve. It is not held back for a saturated entry: local health alone
  would have tried it at once, and it most likely answers.
Every entry skipped is written to the request record once, with how long until it is really tried again
(and, kept out by its breaker, the last error it answered: a lone entry answers with it). An entry skipped
while looking for a target beside attempts still in flight (a hedge) is written only once the request needs
it (`settle`): an attempt started before that skip may still answer, and then nothing fell back past it.
Health is read for the request's kind (`kinds.py`): a model's breakers count each kind apart.

With hedging, when the next target starts is decided here too (`hedge_in`), from numbers the race hands in;
the race itself (starting, cancelling, committing) is the proxy's.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .config import Config, Member, Step, Target
from .health import HALF_OPEN, RATE_LIMITED, SATURATED, UNHEALTHY, HealthTracker
from .kinds import CHAT
from .record import Attempt, RequestRecord


class Plan:
    """The targets one request may try, handed out one at a time (`next()`)."""

    __slots__ = (
        "_config",
        "_deferred",
        "_health",
        "_heard",
        "_kind",
        "_lone",
        "_pool",
        "_record",
        "_rng",
        "_saturated",
        "_steps",
        "_tentative",
    )

    def __init__(
        self,
        steps: tuple[Step, ...],
        config: Config,
        health: HealthTracker,
        record: RequestRecord,
        rng: random.Random,
        kind: str = CHAT,
        *,
        lone: bool = False,
    ) -> None:
        self._steps: Iterator[Step] = iter(steps)
        self._lone = lone  # the request's chain is one entry: an open breaker lets it be the trial
        self._pool: list[Member] = []  # members of the current step not yet handed out nor skipped
        self._config = config
        self._health = health
        self._record = record
        self._rng = rng
        self._kind = kind
        self._deferred: list[tuple[Attempt, Target]] = []  # skipped for a rate limit only, in chain order
        self._heard: list[tuple[Attempt, Target]] = []  # skipped for news only, in chain order
        self._saturated = False  # an entry was skipped as saturated: the rate-limited are held back
        self._tentative: list[Attempt] = []  # skipped beside attempts in flight, not yet written (`settle`)

    def __repr__(self) -> str:
        return f"<Plan left in step: {[str(member.target) for member in self._pool]}>"

    def next(self, *, beside: bool = False) -> Target | None:
        """The next target to try, or None when the chain has run out. `beside`: beside attempts still in
        flight (a hedge), so never the last resort (another entry is being tried), and the entries skipped are
        held (`skipped_beside`) until `settle`; otherwise those held are written to the record first."""
        if not beside:
            self.settle()
        while True:
            if not self._pool:
                step = next(self._steps, None)
                if step is None:
                    return None if beside else self._last_resort()
                self._pool = list(step.members)
            member = self._pick(self._tentative if beside else self._record.attempts)
            if member is not None:
                return member.target

    @property
    def skipped_beside(self) -> int:
        """How many skips looking beside attempts in flight are held, not yet written to the record."""
        return len(self._tentative)

    def settle(self, keep: int | None = None) -> None:
        """Write the first `keep` held skips (all: None) to the record and forget the rest: an answer from
        an attempt started before a skip means nothing fell back past that entry."""
        self._record.attempts.extend(self._tentative[:keep])
        self._tentative = []

    def _pick(self, skipped: list[Attempt]) -> Member | None:
        health = self._health
        usable = []
        for member in self._pool:
            target = member.target
            provider = self._config.providers[target.provider]
            skip = health.skip_reason(provider, target.model, self._kind, member, lone=self._lone)
            if skip is None:
                usable.append(member)
                continue
            wait = health.retry_in(target.provider, target.model, self._kind, lone=self._lone)
            last = health.last_failure(target.provider, target.model, self._kind) if skip == UNHEALTHY else None
            attempt = Attempt.skipped(target, skip, wait, last)
            if skip == SATURATED:
                self._saturated = True
            elif skip == RATE_LIMITED:
                self._deferred.append((attempt, target))
            elif skip in (UNHEALTHY, HALF_OPEN) and health.heard_only(target.provider, target.model, self._kind):
                self._heard.append((attempt, target))
            skipped.append(attempt)
        if not usable:
            self._pool = []
            return None
        chosen = usable[0] if len(usable) == 1 else self._least_loaded(usable)
        usable.remove(chosen)
        self._pool = usable  # the skipped are not looked at again for this request
        return chosen

    def _last_resort(self) -> Target | None:
        """The chain has run out: the next entry kept out by news only, else the entry kept out by a rate limit
        that ends first, tried anyway (its skip is struck from the record: it is tried after all), or None.
        The latter is held back (`held`) while an entry was skipped as saturated."""
        if self._heard:
            attempt, target = self._heard.pop(0)
            return self._tried_after_all(attempt, target)
        return None if self._saturated else self.held()

    def held(self) -> Target | None:
        """The rate-limited entry held back while a saturated one was waited for (see the module's rule), to
        be tried once that wait is over; None when there is none (or it was handed out already)."""
        if not self._deferred:
            return None
        attempt, target = min(self._deferred, key=lambda item: item[0].retry_after or 0.0)
        self._deferred = []
        return self._tried_after_all(attempt, target)

    def _tried_after_all(self, attempt: Attempt, target: Target) -> Target:
        attempts = self._record.attempts
        del attempts[next(index for index, item in enumerate(attempts) if item is attempt)]
        return target

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
