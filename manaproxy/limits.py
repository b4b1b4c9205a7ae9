"""Per-client limits: requests per minute, tokens per minute and per day, by GCRA.

Rule of this module: a limit refuses a request before any upstream call, and never cuts an answer that has
begun. A request is counted when it is let in; its tokens are counted from the upstream's usage once its
answer is over (`Limiter.spend`), so a token window may end up overspent by the last answer: the next
request is then refused until the window has room again.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): a rule of
`limit` per `period` has an emission interval `T = period / limit` and one stored value per client, the
theoretical arrival time `tat`. What is left now is `floor((now + period - max(tat, now)) / T)`; a request is
let in when every rule has at least 1 left, and then moves `tat` on by `T` per request (or per token). It is
exact (no sampling, no window edges where twice the limit passes), a burst of `limit` is allowed after a quiet
`period`, the state is one number per client and rule, and a check-and-count is one atomic step — what a Redis
Lua script does in one round trip, behind the same `LimitBackend` interface (`limits: {backend: redis}`).
`gcra` is pure (the clock is an argument) and table-tested; `redislimits.RedisBackend`'s script is the same
arithmetic in Lua, tested against it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from aiohttp import web

from .config import ClientSpec, LimitSettings
from .errors import ProxyError

logger = logging.getLogger("manaproxy.limits")  # pinned: deploy/README.md documents it

REQUESTS = "requests"
TOKENS = "tokens"
_EPSILON = 1e-9  # float noise: 2.9999999999 left is 3


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit: at most `limit` requests (or tokens) per `period` seconds; `name` keys its state."""

    name: str  # requests_per_minute, tokens_per_minute, tokens_per_day: the config key
    kind: str  # REQUESTS or TOKENS: the 429's `type`, and which x-ratelimit-* trio shows it
    limit: int
    period: float
    interval: float = field(init=False)  # seconds per request (or token): GCRA's emission interval

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", self.period / self.limit)


@functools.lru_cache(maxsize=4096)
def rules_of(client: ClientSpec) -> tuple[Rule, ...]:
    """The client's limits as rules (none when it has no limit); made once per client of a config."""
    rules = []
    if client.requests_per_minute is not None:
        rules.append(Rule("requests_per_minute", REQUESTS, client.requests_per_minute, 60.0))
    if client.tokens_per_minute is not None:
        rules.append(Rule("tokens_per_minute", TOKENS, client.tokens_per_minute, 60.0))
    if client.tokens_per_day is not None:
        rules.append(Rule("tokens_per_day", TOKENS, client.tokens_per_day, 86400.0))
    return tuple(rules)


@functools.lru_cache(maxsize=4096)
def token_rules_of(client: ClientSpec) -> tuple[Rule, ...]:
    return tuple(rule for rule in rules_of(client) if rule.kind == TOKENS)


class Window(NamedTuple):  # a tuple: several are made per request (a frozen dataclass costs 4x more)
    """One rule after a check: what is left, when it is whole again, and (refused) when to retry."""

    rule: Rule
    remaining: int
    reset: float  # seconds until the window is whole again (OpenAI's x-ratelimit-reset-*)
    retry_after: float = 0.0  # > 0: this rule refused the request; seconds until it has room for one


class Verdict(NamedTuple):
    """Whether a request may pass, and each of its client's rules after the check."""

    allowed: bool
    windows: tuple[Window, ...]

    @property
    def refusing(self) -> Window | None:
        """The rule that refused the request, the one with the longest wait when several did."""
        refused = [window for window in self.windows if window.retry_after > 0]
        return max(refused, key=lambda window: window.retry_after) if refused else None


def gcra(
    tats: Sequence[float], rules: Sequence[Rule], now: float, *, requests: int, tokens: int
) -> tuple[list[float], Verdict]:
    """Check and count in one step, for the stored `tats` of `rules` (0.0: never used).

    `requests` > 0 is an admission: let in only when every rule has at least 1 left (a request rule at least
    `requests`), then counted on the request rules. `requests` == 0 is a count after the fact: `tokens` are
    added to the token rules, always "allowed" (an answer already given is never taken back).
    Returns the new tats (unchanged when refused) and the verdict.
    """
    # In offsets from `now` (`ahead`: how far a window's tat is past now): `tat - now` is exact for two clocks
    # this close, and the arithmetic after it stays far from `now`'s magnitude, where an epoch clock (Redis's
    # TIME) has only ~0.2 µs of resolution — enough noise to show a window one request short.
    aheads = [tat - now if tat > now else 0.0 for tat in tats]
    allowed = True
    waits = [0.0] * len(rules)
    if requests > 0:
        for index, rule in enumerate(rules):
            need = requests if rule.kind == REQUESTS else 1
            if (rule.period - aheads[index]) / rule.interval + _EPSILON < need:
                allowed = False
                waits[index] = max(aheads[index] + need * rule.interval - rule.period, _EPSILON)
    new = list(tats)
    windows = []
    for index, rule in enumerate(rules):
        ahead = aheads[index]
        if allowed:
            cost = requests if rule.kind == REQUESTS else tokens
            if cost:
                ahead = ahead + cost * rule.interval
                new[index] = now + ahead
        left = math.floor((rule.period - ahead) / rule.interval + _EPSILON)
        windows.append(Window(rule, left if left > 0 else 0, ahead, waits[index]))
    return new, Verdict(allowed, tuple(windows))


class LimitBackend(Protocol):
    """Where the windows are kept. One call checks and counts atomically: one round trip to a shared store."""

    async def take(self, client: str, rules: Sequence[Rule], *, requests: int, tokens: int) -> Verdict:
        """`gcra` on the stored state of `client`'s `rules`, stored back; raises when the store is unreachable."""
        ...


class MemoryBackend:
    """The windows of this process, in a dict: exact within the process, shared with no other."""

    __slots__ = ("_clock", "_tats")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[tuple[str, str], float] = {}  # (client, rule name) -> tat

    def __repr__(self) -> str:
        return f"<MemoryBackend windows={len(self._tats)}>"

    async def take(self, client: str, rules: Sequence[Rule], *, requests: int, tokens: int) -> Verdict:
        return self.take_now(client, rules, requests=requests, tokens=tokens)

    def count_tokens(self, client: str, rules: Sequence[Rule], tokens: int) -> None:
        """`take(requests=0)` without a verdict: the tokens of an answer given (`gcra`'s count after the fact)."""
        stored = self._tats
        now = self._clock()
        for rule in rules:
            key = (client, rule.name)
            stored[key] = max(stored.get(key, 0.0), now) + tokens * rule.interval

    def take_now(self, client: str, rules: Sequence[Rule], *, requests: int, tokens: int) -> Verdict:
        """`take` without the await (the memory backend never waits)."""
        stored = self._tats
        keys = [(client, rule.name) for rule in rules]
        tats, verdict = gcra(
            [stored.get(key, 0.0) for key in keys], rules, self._clock(), requests=requests, tokens=tokens
        )
        for key, tat in zip(keys, tats, strict=True):
            if tat:
                stored[key] = tat
        return verdict


def format_reset(seconds: float) -> str:
    """A wait as OpenAI writes `x-ratelimit-reset-*` (Go's duration format): `0s`, `120ms`, `1s`, `7.5s`, `6m0s`,
    `1h2m3s`; milliseconds rounded up, so a wait is never shown shorter than it is."""
    millis = math.ceil(seconds * 1000 - _EPSILON * 1000)
    if millis <= 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def headers_of(verdict: Verdict) -> dict[str, str]:
    """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the client's rules: the request trio
    from `requests_per_minute`, the token trio from `tokens_per_minute` (else `tokens_per_day`); `Retry-After`
    (whole seconds, at least 1) when refused."""
    headers: dict[str, str] = {}
    for window in verdict.windows:
        kind = window.rule.kind
        if f"x-ratelimit-limit-{kind}" in headers:
            continue  # tokens_per_minute, listed before tokens_per_day, is shown
        headers[f"x-ratelimit-limit-{kind}"] = str(window.rule.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_reset(window.reset)
    refusing = verdict.refusing
    if refusing is not None:
        headers["Retry-After"] = str(max(1, math.ceil(refusing.retry_after)))
        # The refusing rule's own trio, even when it is tokens_per_day behind a tokens_per_minute that has room.
        kind = refusing.rule.kind
        headers[f"x-ratelimit-limit-{kind}"] = str(refusing.rule.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(refusing.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_reset(refusing.reset)
    return headers


_PER = {60.0: "min", 86400.0: "day"}


def refusal(client: ClientSpec, verdict: Verdict) -> ProxyError:
    """The 429 for a refused request, as OpenAI words it (`type`: requests or tokens, `code`: rate_limit_exceeded)."""
    window = verdict.refusing
    assert window is not None
    rule = window.rule
    unit = "RPM" if rule.name == "requests_per_minute" else "TPM" if rule.name == "tokens_per_minute" else "TPD"
    message = (
        f"Rate limit reached for client {client.name!r} on {rule.kind} per {_PER.get(rule.period, 'period')} "
        f"({unit}): Limit {rule.limit}, Remaining {window.remaining}. "
        f"Please try again in {format_reset(window.retry_after)}."
    )
    return ProxyError(
        429,
        message,
        code="rate_limit_exceeded",
        headers=headers_of(verdict),
        relayed={"message": message, "type": rule.kind, "param": None, "code": "rate_limit_exceeded"},
    )


# The verdict of a request's admission, for its response's x-ratelimit-* headers (`ratelimit_headers`).
VERDICT = web.RequestKey("limit_verdict", Verdict)


async def ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: a limited client's every answer (errors and streams included) carries its own
    `x-ratelimit-*`, which replace any an upstream sent (those describe manaproxy's account, not the client)."""
    verdict = request.get(VERDICT)
    if verdict is None:
        return
    headers = response.headers
    for name in [name for name in headers if name.lower().startswith("x-ratelimit-")]:
        headers.popall(name, None)
    headers.update(headers_of(verdict))


_WARN_EVERY = 10.0  # seconds: a backend that fails on and off is warned about at most this often


class Limiter:
    """The limits of every client, kept by one backend; what a backend failure means (`limits.on_backend_error`).

    `local` is this process's memory backend; `shared` (given by the gateway) the Redis one. Which one counts
    is `settings.backend`'s, so a reload may switch them (the memory windows are kept meanwhile)."""

    __slots__ = ("_failing", "_last_warning", "_tasks", "backend", "errors", "local", "settings", "shared")

    def __init__(self, local: LimitBackend, settings: LimitSettings, *, shared: LimitBackend | None = None) -> None:
        self.local = local
        self.shared = shared
        self.backend = local
        self.settings = settings
        self.configure(settings)
        self.errors = 0  # backend failures (`mana_llm_client_limit_errors_total`)
        self._failing = False  # the last check failed: warned when it started, told when it ends
        self._last_warning = -math.inf
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Limiter {self.backend!r} on_backend_error={self.settings.on_backend_error} errors={self.errors}>"

    def configure(self, settings: LimitSettings) -> None:
        """Take `settings` (at start and on reload): the policy, and which backend keeps the windows."""
        self.settings = settings
        shared = self.shared if settings.backend == "redis" else None
        self.backend = shared if shared is not None else self.local

    async def admit(self, client: ClientSpec) -> Verdict | None:
        """Count a request of `client` against its limits: its verdict (None: no limits, or the backend failed
        with `on_backend_error: open`); raises the 429 when a window is spent, a 503 when the backend failed with
        `on_backend_error: closed`."""
        rules = rules_of(client)
        if not rules:
            return None
        try:
            verdict = await self.backend.take(client.name, rules, requests=1, tokens=0)
        except Exception as exc:
            self._failed(exc)
            if self.settings.on_backend_error == "closed":
                raise ProxyError(
                    503,
                    "client limits cannot be checked right now; retry shortly",
                    code="limits_unavailable",
                    headers={"Retry-After": "1"},
                ) from None
            return None
        if self._failing:
            self._recovered()
        if not verdict.allowed:
            raise refusal(client, verdict)
        return verdict

    def spend(self, client: ClientSpec, tokens: int) -> None:
        """Count `tokens` of an answer given to `client` against its token limits (in the background: the
        answer is over, nothing waits on it)."""
        rules = token_rules_of(client)
        if not rules or tokens <= 0:
            return
        backend = self.backend
        if isinstance(backend, MemoryBackend):  # no I/O: counted now, before the next request can look
            backend.count_tokens(client.name, rules, tokens)
            return
        task = asyncio.get_running_loop().create_task(self._spend(backend, client.name, rules, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spend(self, backend: LimitBackend, name: str, rules: tuple[Rule, ...], tokens: int) -> None:
        try:
            await backend.take(name, rules, requests=0, tokens=tokens)
        except Exception as exc:
            self._failed(exc)

    async def settle(self) -> None:
        """Let the token counts under way finish (each is bounded by the backend's timeout): in tests, at shutdown."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self._failing:
            return  # one line per outage, not one per request
        self._failing = True
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY:  # ... and one per while when it comes and goes
            self._last_warning = now
            logger.warning(
                "client limit backend failed (%s: %s); requests are %s while it does",
                type(exc).__name__,
                exc,
                "let in" if self.settings.on_backend_error == "open" else "refused",
            )

    def _recovered(self) -> None:
        self._failing = False
        logger.info("client limit backend answers again: limits are enforced (%d checks failed so far)", self.errors)
