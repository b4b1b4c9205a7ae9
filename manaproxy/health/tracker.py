"""Health of every configured provider and of each of its models: breakers, in-flight counts, and the one
seam that feeds them.

Rule of this module: every health decision is made here and fed through one seam, `attempt()`, from
two sources only — real requests (`proxy.py`) and active probes (`probe.py`). A `Slot` maps an outcome
(an answer, an `UpstreamFailure`, a failure after the commit point) onto a `Breaker` exactly one way for
both. Time comes from an injected monotonic clock so tests can drive it. Listeners hear each
healthy⇄unhealthy transition of a provider; a listener that raises is logged and ignored.

Health is scoped to what failed (the failure's `scope`, set where it is translated):
- the **provider** breaker counts what says the upstream as a whole is broken — connect, DNS and TLS
  errors, a connection reset before an answer — and every probe; while it is open every model of the
  provider is skipped;
- each **target** (provider + model) has breakers of its own for HTTP errors, timeouts waiting for that
  model, bad answers and failures mid-stream — one per kind of request (`kinds.py`: the endpoint and the
  input's shape, so image requests a text-only model refuses, or embeddings a server was started without,
  never block its plain chat) — and one rate limit: a 429 on one Groq model, or a model that 500s, leaves the
  provider's other models in use. A model's breakers let one real request through as a trial at each
  recovery time (1 s, 2 s, 4 s …, `breaker.py`), as probes do for a provider.
A success proves the provider and the kind it was.

What is not a failure: a 429 is a rate limit (the provider's hint, `failures.rate_limit_hint`, else a
short growing default, `breaker.py`); a 501, or a 5xx saying the feature is "not supported", says the
endpoint or feature is missing there (`missing_feature`): both fall back and neither counts.

A 401/403 (`CREDENTIALS`) says our key is refused, or only this model or this request (a model the account
may not use, a moderation refusal): a client may name any `provider/model` and send anything, so a request's
401/403 alone never opens a breaker. It falls back, is noted on the target (its `last_error`), and asks for
a credential check: the provider's probe, with our key and nothing of the client's, at most once per
`credential_check_seconds`. A probe answered 401/403 is our key refused: the provider's breaker opens at
once (recovery probes close it when the key works again).

Target records exist for the models actually asked for, at most
`MAX_TARGETS_PER_PROVIDER` per provider (a client may name any `provider/model`): past that, healthy
records idle for the longest make room.

Load is the tracker's too: `max_concurrent` caps a provider's requests and probes in flight; with
`max_concurrent: auto` each target's own limit is learned (`capacity.py`) from the answers' times, and a
target at its limit is skipped as `saturated`. Hedges and probes hold a place like any request. A freed
place wakes whoever waits for one (`slot_freed`).

News (`news.py`, with `health: {shared: true}`): what this process sees first-hand — a breaker opening, a
rate limit, a breaker closing — is told to the news listeners (`add_news_listener`; `manaproxy.sharedhealth`
publishes it), and news other processes saw is applied here (`apply_news`) as if seen here: a breaker opens
for a window bounded by `backoff_seconds` and is probed (or tried) as after an opening of its own; a rate
limit is kept. News only makes a target skipped sooner or used sooner: it never changes a breaker this
process opened itself, "up" closes only a breaker that news opened, and an entry kept out by news alone
(`heard_only`) is still tried once the rest of its chain has failed (`plan.py`), as local health alone would.

A reload keeps each provider's record while its upstream stays the same (kind, base_url, key, headers);
an outcome observed by a request still running on an older config is dropped when that provider has
since been repointed or removed (`is_current`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from .. import logfmt
from ..config import AutoConcurrency, HealthSettings, Member, ProviderConfig, Target
from ..failures import (
    CREDENTIALS,
    PROVIDER,
    RATE_LIMITED,
    SATURATED,
    UNCONFIGURED,
    SkipReason,
    UpstreamFailure,
    rate_limit_hint,
)
from ..kinds import CHAT
from ..redact import Redactor
from .breaker import FIRST_RATE_LIMIT_DELAY, OPENED, Breaker
from .capacity import ANSWER, PER_TOKEN, TTFB, Capacity
from .latency import Client, HedgeBudget, LatencySample
from .news import DOWN, UP, News
from .news import RATE_LIMITED as RATE_LIMIT_NEWS

# Pinned, not `__name__`: operators grep for it (deploy/README.md, "Other lines worth knowing").
logger = logging.getLogger("manaproxy.health")

Clock = Callable[[], float]
Listener = Callable[[str, bool], None]
ProbeListener = Callable[[str], None]
NewsListener = Callable[[News], None]

MAX_TARGETS_PER_PROVIDER = 256
# A 429 is news when it starts a rate-limit window or makes one longer by this much: a lone entry's client
# retrying against its 429s does not publish one message per request.
_NEWS_WORTHY_SECONDS = 1.0

# llama.cpp's 500 "image input is not supported", vLLM's "... is not supported", "Not Implemented" ...
_UNSUPPORTED_RE = re.compile(r"\bnot supported\b|\bunsupported\b|\bnot implemented\b", re.IGNORECASE)


def missing_feature(failure: UpstreamFailure) -> bool:
    """A 501, or a 5xx whose message says the feature is not supported: the endpoint or feature is missing
    there, not broken. It falls back, and counts against nothing."""
    status = failure.status
    if status is None or status < 500:
        return False
    return status == 501 or _UNSUPPORTED_RE.search(failure.detail) is not None


def _identity(provider: ProviderConfig) -> tuple[object, ...]:
    """What makes a provider the same upstream across a reload (its health history then still applies)."""
    return (provider.kind, provider.base_url, provider.api_key, tuple(sorted(provider.headers.items())))


class TargetHealth:
    """Mutable health record of one model of a provider: `breaker` counts plain chat requests (`kinds.CHAT`)
    and holds the model's rate limit and last error; every other kind of request has a breaker in `kinds`."""

    __slots__ = ("breaker", "capacity", "in_flight", "kinds", "last_failures", "model", "ttfb")

    def __init__(self, model: str) -> None:
        self.model = model
        self.breaker = Breaker(trials=True)
        self.kinds: dict[str, Breaker] = {}  # by kind (bounded: `kinds.py`), but CHAT's is `breaker`
        # The last HTTP failure of each kind: what a lone entry kept out answers with (`proxy.exhausted`).
        self.last_failures: dict[str, UpstreamFailure] = {}
        self.in_flight = 0
        # Seconds to the answer (unstreamed) and to the first event (streamed) of the last answered requests.
        self.ttfb: tuple[LatencySample, LatencySample] = (LatencySample(), LatencySample())
        self.capacity: Capacity | None = None  # `max_concurrent: auto`: the learned limit (made on first use)

    def __repr__(self) -> str:
        breaker = self.breaker
        state = "healthy" if breaker.healthy else "unhealthy"
        return f"<TargetHealth {self.model} {state} failures={breaker.consecutive_failures} in_flight={self.in_flight}>"

    @property
    def idle(self) -> bool:
        """Nothing here worth keeping: no request in flight, closed, no window running."""
        breakers = (self.breaker, *self.kinds.values())
        return not self.in_flight and all(b.healthy and not b.consecutive_failures for b in breakers)

    def of_kind(self, kind: str) -> Breaker:
        """The breaker that counts requests of `kind` (made on first use)."""
        if kind == CHAT:
            return self.breaker
        breaker = self.kinds.get(kind)
        if breaker is None:
            breaker = self.kinds[kind] = Breaker(trials=True)
        return breaker

    def skip_reason(self, kind: str, now: float, *, lone: bool = False) -> SkipReason | None:
        """Why a request of `kind` must not be sent to this model now: its kind's breaker, or the model's
        rate limit. `lone`: a lone chain entry's request (`Breaker.skip_reason`'s `anytime`)."""
        if kind == CHAT:
            return self.breaker.skip_reason(now, anytime=lone)
        breaker = self.kinds.get(kind)
        reason = breaker.skip_reason(now, anytime=lone) if breaker is not None else None
        if reason is None and self.breaker.rate_limited_until > now:
            reason = RATE_LIMITED
        return reason

    def retry_at(self, kind: str, now: float, *, lone: bool = False) -> float:
        """When a request of `kind` (`lone`: a lone chain entry's) will really be sent to this model again (0:
        it is not kept out)."""
        if kind == CHAT:
            return self.breaker.retry_at(now, anytime=lone)
        breaker = self.kinds.get(kind)
        at = breaker.retry_at(now, anytime=lone) if breaker is not None else 0.0
        limit = self.breaker.rate_limited_until
        return max(at, limit) if limit > now else at


class ProviderHealth:
    """Mutable health record of one provider, and of the models of it that were asked for."""

    __slots__ = (
        "breaker",
        "check_allowed_at",
        "check_wanted",
        "in_flight",
        "last_latency",
        "name",
        "probing",
        "targets",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.breaker = Breaker()
        self.in_flight = 0
        self.probing = 0  # probes in flight: they hold a place too (`max_concurrent`, learned limits)
        self.last_latency: float | None = None
        self.check_wanted = False  # a request got 401/403: a probe is to tell our key from the request
        self.check_allowed_at = 0.0  # monotonic; credential checks are at most this often
        self.targets: dict[str, TargetHealth] = {}  # by model, oldest first

    def __repr__(self) -> str:
        breaker = self.breaker
        state = "healthy" if breaker.healthy else "unhealthy"
        return (
            f"<ProviderHealth {self.name} {state} failures={breaker.consecutive_failures} "
            f"in_flight={self.in_flight} last_error={breaker.last_error!r}>"
        )

    def target(self, model: str) -> TargetHealth | None:
        """The model's record, made on first use; None when the provider already tracks as many models
        as it may and none of them can make room."""
        record = self.targets.get(model)
        if record is not None:
            return record
        if len(self.targets) >= MAX_TARGETS_PER_PROVIDER:
            spare = next((name for name, target in self.targets.items() if target.idle), None)
            if spare is None:
                return None
            del self.targets[spare]
        record = self.targets[model] = TargetHealth(model)
        return record


class Slot:
    """One request's (or probe's) claim on a provider and model, and the way its outcome reaches the
    breakers. Outcomes of a request that started on a config whose provider has since been repointed or
    removed are dropped: they are about an upstream the config no longer names."""

    __slots__ = (
        "_client",
        "_concurrency",
        "_kind",
        "_model",
        "_probe",
        "_provider",
        "_started",
        "_stream",
        "_tracker",
        "_trial",
    )

    def __init__(
        self,
        tracker: HealthTracker,
        provider: ProviderConfig,
        model: str | None,
        *,
        probe: bool,
        stream: bool = False,
        client: Client = None,
        kind: str = CHAT,
        trial: bool = False,
        started: float = 0.0,
        concurrency: int = 0,
    ) -> None:
        self._tracker = tracker
        self._provider = provider
        self._model = model
        self._probe = probe
        self._stream = stream
        self._client = client
        self._kind = kind
        self._trial = trial  # this request is its model's trial while that breaker is open
        self._started = started  # the tracker's clock when the place was claimed
        self._concurrency = concurrency  # requests in flight to the target then, this one included

    def __repr__(self) -> str:
        target = self._provider.name + (f"/{self._model}" if self._model else "")
        return f"<Slot {target}{' probe' if self._probe else ''}>"

    def succeeded(self, latency: float | None = None, tokens: int | None = None) -> None:
        """The provider answered (a request: its first byte or whole answer, of `tokens` output tokens when
        its usage said; a probe: its check)."""
        if self._tracker.is_current(self._provider):
            self._tracker.succeeded(
                self._provider.name,
                latency,
                model=self._model,
                probe=self._probe,
                stream=self._stream,
                client=self._client,
                kind=self._kind,
            )
            if latency is not None and self._model is not None and not self._probe:
                self._tracker.timed(
                    self._provider, self._model, latency, tokens, self._stream, self._started, self._concurrency
                )

    def failed(self, failure: UpstreamFailure) -> None:
        """The provider failed before anything reached the client: the one failure → health mapping."""
        tracker = self._tracker
        if not tracker.is_current(self._provider):
            return
        name = self._provider.name
        # A probe asks the provider as a whole; so do transport failures.
        model = None if self._probe or failure.scope == PROVIDER else self._model
        detail = f"probe: {failure.detail}" if self._probe else failure.detail
        if failure.scope == CREDENTIALS:
            if self._probe:  # our key, and nothing of a client's, refused: nothing there can answer
                tracker.failed(name, detail, probe=True, at_once=True)
            else:  # our key, or only this model or request? A probe decides
                tracker.denied(name, detail, model=self._model)
        elif failure.status == 429 or failure.retry_after is not None:
            # A rate limit, never an outage: out for the provider's hint, or the short growing default.
            hint = failure.retry_after if failure.retry_after is not None else rate_limit_hint(failure.headers)
            tracker.rate_limited(name, hint, detail, model=model)
        elif missing_feature(failure):  # the endpoint or feature is missing there, not broken
            tracker.noted(name, detail, model=model)
        elif failure.provider_fault:
            trial = self._trial and model is not None  # a failed trial: the next one waits twice as long
            tracker.failed(name, detail, model=model, kind=self._kind, probe=self._probe or trial)
            if model is not None:  # what a lone entry kept out answers with: its last HTTP error, if that
                tracker.remember(name, model, self._kind, failure if failure.status is not None else None)
        elif failure.fallback or self._probe:
            tracker.noted(name, detail, model=model)
        # A caller error (400, 422 ...) says nothing about the provider: its record is left alone.

    def failed_after_commit(self, detail: str) -> None:
        """The model failed mid-stream, after the commit point: a fault of that target."""
        if self._tracker.is_current(self._provider):
            self._tracker.failed(self._provider.name, detail, model=self._model, kind=self._kind)


class HealthTracker:
    """Health state of every configured provider and of its models."""

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
        self._probe_listeners: list[ProbeListener] = []
        self._hedge_budgets: dict[str, HedgeBudget] = {}  # by alias (configured names only)
        # Set (and dropped) when a place of the target — (provider, None): of the provider — is given back.
        self._freed: dict[tuple[str, str | None], asyncio.Event] = {}
        self._news_listeners: list[NewsListener] = []
        # Breakers (`News.key`) that news opened, and the instance it came from; a local outcome ends it.
        self._heard: dict[tuple[str, str | None, str], str] = {}

    def __repr__(self) -> str:
        return f"<HealthTracker {list(self._providers.values())!r}>"

    # -- configuration ----------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call `listener(provider, healthy)` on every transition of a provider's breaker."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def add_probe_listener(self, listener: ProbeListener) -> None:
        """Call `listener(provider)` when a provider wants a probe now (a credential check)."""
        self._probe_listeners.append(listener)

    def remove_probe_listener(self, listener: ProbeListener) -> None:
        self._probe_listeners.remove(listener)

    def add_news_listener(self, listener: NewsListener) -> None:
        """Call `listener(news)` for what this process saw first-hand (never for news it was told)."""
        self._news_listeners.append(listener)

    def remove_news_listener(self, listener: NewsListener) -> None:
        self._news_listeners.remove(listener)

    def reconfigure(self, settings: HealthSettings, providers: Mapping[str, ProviderConfig]) -> None:
        """After a reload: keep state of providers that still exist, add new ones, drop removed ones.

        A provider whose upstream changed (kind, base_url, key, headers) starts afresh, its models too: an
        operator who points a failing provider elsewhere and reloads wants it tried now, not after the old
        breaker window. Its in-flight count carries over, since requests still running on the old config
        will release it.
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
                in_flight, probing = record.in_flight, record.probing
                record = ProviderHealth(name)
                record.in_flight, record.probing = in_flight, probing
            fresh[name] = record or ProviderHealth(name)
        self._providers = fresh
        self._identities = identities
        self._heard = {key: origin for key, origin in self._heard.items() if previous.get(key[0]) is fresh.get(key[0])}
        for name in recovered:
            self._notify(name, True)

    def get(self, provider: str) -> ProviderHealth:
        """The provider's record; a detached blank one for a provider the current config does not declare
        (an outcome recorded there, by a request still running on an old config, changes nothing)."""
        record = self._providers.get(provider)
        return record if record is not None else ProviderHealth(provider)

    def target(self, provider: str, model: str) -> TargetHealth:
        """The model's record (a blank detached one when the provider has none for it)."""
        record = self.get(provider).targets.get(model)
        return record if record is not None else TargetHealth(model)

    def is_current(self, provider: ProviderConfig) -> bool:
        """Whether `provider` (from the config a request started with) is the upstream tracked now."""
        return self._identities.get(provider.name) == _identity(provider)

    def names(self) -> list[str]:
        """Names of the providers tracked now (those of the current config)."""
        return list(self._providers)

    def recovery_probes(self) -> tuple[list[str], float | None]:
        """(providers whose breaker wants a recovery probe now, or a credential check, monotonic time of the
        next recovery probe due later)."""
        now = self._clock()
        due = []
        later: float | None = None
        for name, record in self._providers.items():
            if record.check_wanted:
                due.append(name)
                continue
            breaker = record.breaker
            if breaker.healthy:
                continue
            if breaker.probe_due(now):
                due.append(name)
            elif later is None or breaker.probe_at < later:
                later = breaker.probe_at
        return due, later

    # -- time --------------------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    def unix(self, monotonic_time: float, now: float | None = None) -> float:
        """A monotonic time of this tracker's clock as unix time."""
        return self._wall_clock() + (monotonic_time - (self._clock() if now is None else now))

    # -- decisions -------------------------------------------------------------------------------
    def skip_reason(
        self,
        provider: ProviderConfig,
        model: str | None = None,
        kind: str = CHAT,
        member: Member | None = None,
        *,
        lone: bool = False,
    ) -> SkipReason | None:
        """Why this provider (and its `model`, if given, for a request of `kind`; as the pool `member`, if
        given, with a limit of its own) must not be tried now, or None when it may be. `lone`: the request's
        chain is this one entry, so an open breaker (the provider's or the model's) lets it be the trial
        whenever none is under way (`Breaker`'s module doc)."""
        if not provider.configured:
            return UNCONFIGURED
        record = self.get(provider.name)
        now = self._clock()
        reason = record.breaker.skip_reason(now, anytime=lone)
        if reason is None and model is not None:
            target = record.targets.get(model)
            if target is not None:
                reason = target.skip_reason(kind, now, lone=lone)
        if reason is not None:
            return reason
        if provider.max_concurrent and record.in_flight + record.probing >= provider.max_concurrent:
            return SATURATED
        if model is None:
            return None
        fixed = member.max_concurrent if member is not None else 0
        bounds = member.auto_concurrency if member is not None else None
        if not fixed and bounds is None:
            bounds = provider.auto_concurrency
        if not fixed and bounds is None:
            return None
        target = record.targets.get(model)
        if target is None:
            return None  # nothing in flight there yet
        if not fixed:  # learned: a member's own `auto` makes the target learn from its first request on
            capacity = self.capacity(provider, model, bounds)
            fixed = capacity.allowed if capacity is not None else 0
        if fixed and target.in_flight + record.probing >= fixed:
            return SATURATED
        return None

    def capacity(self, provider: ProviderConfig, model: str, bounds: AutoConcurrency | None = None) -> Capacity | None:
        """The learned limit of the target, made on first use with `bounds` (default: the provider's
        `max_concurrent: auto`, or what it was made with); None when there are none, or for a model past the
        tracking bound. What it learned stays when the bounds change (a reload, or a pool member's own)."""
        record = self._providers.get(provider.name)
        target = record.targets.get(model) if record is not None else None
        if bounds is None:
            if target is not None and target.capacity is not None and provider.auto_concurrency is None:
                return target.capacity  # made by a pool member's own `auto`
            bounds = provider.auto_concurrency
        target = record.target(model) if bounds is not None and record is not None else None
        if target is None or bounds is None:
            return None
        if target.capacity is None:
            target.capacity = Capacity(bounds)
        elif target.capacity.bounds != bounds:
            target.capacity.rebound(bounds)
        return target.capacity

    def timed(
        self,
        provider: ProviderConfig,
        model: str,
        seconds: float,
        tokens: int | None,
        stream: bool,
        started: float,
        concurrency: int,
    ) -> None:
        """An answer of the target, started at `started` with `concurrency` in flight, came after `seconds`
        (to its first event when streamed; `tokens` output tokens unstreamed, when its usage said): what its
        learned limit learns from."""
        capacity = self.capacity(provider, model)
        if capacity is None:
            return
        if stream:
            signal, value = TTFB, seconds
        elif tokens:
            signal, value = PER_TOKEN, seconds / tokens
        else:
            signal, value = ANSWER, seconds
        capacity.observe(signal, value, started=started, concurrency=concurrency, now=self._clock())

    async def slot_freed(self, targets: list[Target], timeout: float) -> bool:
        """Wait until a place of any of `targets` (or of its provider) is given back, at most `timeout`
        seconds; whether one was."""
        events = set()
        for target in targets:
            for key in ((target.provider, target.model), (target.provider, None)):
                event = self._freed.get(key)
                if event is None:
                    event = self._freed[key] = asyncio.Event()
                events.add(event)
        waits = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            done, _ = await asyncio.wait(waits, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return bool(done)

    def _free(self, provider: str, model: str | None) -> None:
        for key in ((provider, model), (provider, None)) if model is not None else ((provider, None),):
            event = self._freed.pop(key, None)
            if event is not None:
                event.set()

    @contextmanager
    def attempt(
        self,
        provider: ProviderConfig,
        model: str | None = None,
        *,
        probe: bool = False,
        stream: bool = False,
        client: Client = None,
        kind: str = CHAT,
        lone: bool = False,
    ) -> Iterator[Slot]:
        """Claim `provider` (and `model`, for a request of `kind`; `lone`: as `skip_reason`'s) for one
        request, or probe, while the block runs; record its outcome on the slot.

        A request counts as in flight (for `max_concurrent`, learned or fixed) until the block exits,
        however it exits — a client that left must not hold a slot; so does a probe, for the provider. When a
        breaker is half-open the first request to claim it is its trial, and the others skip it until that is
        decided; probes claim no trial. `client` (a hash of the client's key) is whose answer a time to first
        byte is.
        """
        record = self._providers.get(provider.name)  # None: removed by a reload that raced this request
        if record is not None and probe:
            record.check_wanted = False  # this probe is the credential check
        target = record.target(model) if record is not None and model is not None and not probe else None
        now = self._clock()
        trial = target_trial = 0
        if record is not None and probe:
            record.probing += 1
        elif record is not None:
            record.in_flight += 1
            trial = record.breaker.claim_trial(now, anytime=lone)
        if target is not None and provider.auto_concurrency is not None and model is not None:
            self.capacity(provider, model)  # its limit holds from the first request on
        kind_breaker = target.of_kind(kind) if target is not None else None
        scheduled = False  # the trial claimed is the breaker's own, not only a lone request's (`Breaker.scheduled`)
        if target is not None and kind_breaker is not None:
            target.in_flight += 1
            scheduled = kind_breaker.scheduled(now)
            target_trial = kind_breaker.claim_trial(now, anytime=lone)
        # Requests of ours in flight to the target, this one included (probes ask the provider, not the model).
        concurrency = target.in_flight if target is not None else 0
        try:
            yield Slot(
                self,
                provider,
                model,
                probe=probe,
                stream=stream,
                client=client,
                kind=kind,
                trial=bool(target_trial) and scheduled,
                started=now,
                concurrency=concurrency,
            )
        finally:
            if record is not None and probe:
                record.probing = max(0, record.probing - 1)
            elif record is not None:
                record.in_flight = max(0, record.in_flight - 1)
                record.breaker.release_trial(trial)
            if target is not None and kind_breaker is not None:
                target.in_flight = max(0, target.in_flight - 1)
                kind_breaker.release_trial(target_trial)
            self._free(provider.name, model if target is not None else None)

    # -- outcomes (what a Slot records) ------------------------------------------------------------
    def _breaker(self, provider: str, model: str | None, kind: str = CHAT) -> Breaker | None:
        """The breaker an outcome of this scope goes to (None for a model past the tracking bound)."""
        record = self.get(provider)
        if model is None:
            return record.breaker
        target = record.target(model) if provider in self._providers else None
        return target.of_kind(kind) if target is not None else None

    def remember(self, provider: str, model: str, kind: str, failure: UpstreamFailure | None) -> None:
        """Keep the model's last HTTP failure of `kind` (None: its last failure had no status): a lone chain
        entry kept out answers with it."""
        record = self._providers.get(provider)
        target = record.targets.get(model) if record is not None else None
        if target is None:
            return
        if failure is None:
            target.last_failures.pop(kind, None)
        else:
            target.last_failures[kind] = failure

    def last_failure(self, provider: str, model: str, kind: str = CHAT) -> UpstreamFailure | None:
        """The model's last HTTP failure of `kind` (its status, error object and headers), if any."""
        return self.target(provider, model).last_failures.get(kind)

    def succeeded(
        self,
        provider: str,
        latency: float | None = None,
        *,
        model: str | None = None,
        probe: bool = False,
        stream: bool = False,
        client: Client = None,
        kind: str = CHAT,
    ) -> None:
        """A request got its answer (closes the provider's breaker and the model's of its kind, and ends the
        model's growing rate-limit default), or a probe passed (closes the provider's)."""
        record = self.get(provider)
        now = self._clock()
        if latency is not None:
            record.last_latency = latency
        if probe:
            closed, why = record.breaker.probe_succeeded(now, self.settings.backoff_seconds), "a probe succeeded"
        else:
            closed, why = record.breaker.succeeded(now), "a request succeeded"
            target = record.targets.get(model) if model is not None else None
            if target is not None:
                if latency is not None:
                    target.ttfb[stream].add(latency, client)
                if kind != CHAT:  # an answer ends the model's growing rate-limit default whatever its kind
                    target.breaker.rate_limit_delay = FIRST_RATE_LIMIT_DELAY
                if target.of_kind(kind).succeeded(now):
                    logger.warning("model %s/%s recovered (%s): breaker closed", provider, logfmt.value(model), kind)
                    self._tell(News(UP, provider, model, kind))
        if closed:
            logger.warning("provider %s recovered (%s): breaker closed", provider, why)
            self._notify(provider, True)
            self._tell(News(UP, provider))

    def failed(
        self,
        provider: str,
        error: str,
        *,
        model: str | None = None,
        kind: str = CHAT,
        probe: bool = False,
        at_once: bool = False,
    ) -> None:
        """Count a fault of the provider (`model` None) or of one of its models for requests of `kind`;
        `at_once`: one is enough to open the breaker (a probe refused our key); `probe`: a recovery probe's
        or trial request's failure."""
        breaker = self._breaker(provider, model, kind)
        if breaker is None:
            return
        if model is not None and kind != CHAT:
            self.noted(provider, error, model=model)  # the model's last error, whatever its kind
        settings = self.settings
        change = breaker.failed(
            self._clock(),
            self._redactor.line(error),
            threshold=1 if at_once else settings.failure_threshold,
            backoff=settings.backoff_seconds,
            probe=probe,
            key_refused=at_once,
        )
        if change is None:
            return
        if not at_once:  # our key refused says nothing of the key another instance holds
            self._tell(News(DOWN, provider, model, kind, settings.backoff_seconds))
        what = f"provider {provider}" if model is None else f"model {provider}/{logfmt.value(model)}"
        if model is not None and kind != CHAT:
            what = f"{what} ({kind})"
        if change == OPENED:
            logger.warning(
                "%s unhealthy after %d consecutive failures, out for %gs: %s",
                what,
                breaker.consecutive_failures,
                settings.backoff_seconds,
                logfmt.value(breaker.last_error),
            )
            if model is None:
                self._notify(provider, False)
        else:
            logger.warning(
                "%s still failing, out again for %gs: %s",
                what,
                settings.backoff_seconds,
                logfmt.value(breaker.last_error),
            )

    def denied(self, provider: str, error: str, *, model: str | None = None) -> None:
        """A request got 401/403: our key refused, or only this model or request. Noted on the target, and
        a credential check (the provider's probe) asked for, at most once per `credential_check_seconds`;
        the probe's answer is what counts (see the module's rule)."""
        self.noted(provider, error, model=model)
        record = self._providers.get(provider)
        now = self._clock()
        if record is None or record.check_wanted or now < record.check_allowed_at:
            return
        record.check_wanted = True
        record.check_allowed_at = now + self.settings.credential_check_seconds
        for listener in self._probe_listeners:
            try:
                listener(provider)
            except Exception:
                logger.exception("probe listener %r failed for provider %s", listener, provider)

    def rate_limited(self, provider: str, retry_after: float | None, error: str, *, model: str | None = None) -> None:
        """A 429: keep the model (or provider) out for its hint (None: the short growing default), without
        counting an outage."""
        breaker = self._breaker(provider, model)
        if breaker is not None:
            now = self._clock()
            known = max(breaker.rate_limited_until, now)
            breaker.rate_limited(now, retry_after, self._redactor.line(error))
            if breaker.rate_limited_until - known >= _NEWS_WORTHY_SECONDS:  # a new window, or one much longer
                self._tell(News(RATE_LIMIT_NEWS, provider, model, CHAT, breaker.rate_limited_until - now))

    def noted(self, provider: str, error: str, *, model: str | None = None) -> None:
        """An answer that says nothing about health (e.g. 404 model not served): only remembered."""
        breaker = self._breaker(provider, model)
        if breaker is not None:
            breaker.noted(self._clock(), self._redactor.line(error))

    # -- news (see the module's rule) ------------------------------------------------------------
    def _tell(self, news: News) -> None:
        """What this process saw first-hand: to the news listeners. A breaker it opened or closed itself is
        its own from now on, whatever news opened it."""
        if news.event != RATE_LIMIT_NEWS:
            self._heard.pop(news.key, None)
        for listener in self._news_listeners:
            try:
                listener(news)
            except Exception:
                logger.exception("news listener %r failed for provider %s", listener, news.provider)

    def apply_news(self, news: News, origin: str) -> bool:
        """News another process (`origin`) saw first-hand, applied as if seen here (bounded by
        `backoff_seconds`); never told on. True if it changed anything."""
        record = self._providers.get(news.provider)
        if record is None:
            return False
        now = self._clock()
        seconds = min(news.seconds, self.settings.backoff_seconds)
        breaker: Breaker | None
        if news.model is None:
            breaker = record.breaker
        elif news.event == UP:  # nothing to close where there is no record
            target = record.targets.get(news.model)
            breaker = None if target is None else target.breaker if news.kind == CHAT else target.kinds.get(news.kind)
        else:  # a model's rate limit is its chat breaker's, whatever the kind
            target = record.target(news.model)
            breaker = None if target is None else target.of_kind(news.kind if news.event == DOWN else CHAT)
        if breaker is None:
            return False
        what = (
            f"provider {news.provider}" if news.model is None else f"model {news.provider}/{logfmt.value(news.model)}"
        )
        if news.model is not None and news.kind != CHAT:
            what = f"{what} ({news.kind})"
        if news.event == DOWN:
            if not breaker.heard_down(now, seconds, f"news from instance {origin}: down there"):
                return False
            self._heard[news.key] = origin
            logger.warning("%s unhealthy per news from instance %s, out for at most %gs", what, origin, seconds)
            if news.model is None:
                self._notify(news.provider, False)
            return True
        if news.event == UP:
            if news.key not in self._heard or not breaker.heard_up(now):
                return False  # open here for what this process saw itself: its own probes decide
            del self._heard[news.key]
            logger.warning("%s recovered (news from instance %s): breaker closed", what, origin)
            if news.model is None:
                self._notify(news.provider, True)
            return True
        if seconds <= 0 or breaker.rate_limited_until >= now + seconds:
            return False
        breaker.rate_limited(now, seconds, f"news from instance {origin}: rate-limited there")
        return True

    def heard_only(self, provider: str, model: str | None = None, kind: str = CHAT) -> bool:
        """Whether the provider (and `model`, for a request of `kind`) is kept out by its breakers only because
        of news, with fewer failures seen here than would open them: local health alone would try it."""
        if not self._heard:
            return False
        record = self.get(provider)
        breakers: list[tuple[tuple[str, str | None, str], Breaker]] = [((provider, None, CHAT), record.breaker)]
        target = record.targets.get(model) if model is not None else None
        if target is not None and model is not None:
            breaker = target.breaker if kind == CHAT else target.kinds.get(kind)
            if breaker is not None:
                breakers.append(((provider, model, kind), breaker))
        heard = False
        for key, breaker in breakers:
            if breaker.healthy:
                continue
            if key not in self._heard or breaker.consecutive_failures >= self.settings.failure_threshold:
                return False
            heard = True
        return heard

    def _notify(self, provider: str, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                listener(provider, healthy)
            except Exception:
                logger.exception("health listener %r failed for provider %s", listener, provider)

    # -- reporting -------------------------------------------------------------------------------
    def breaker(self, provider: str, model: str | None = None, kind: str = CHAT) -> str:
        """`closed`, `open` or `half_open` of the provider's (or one model's, for requests of `kind`) breaker."""
        if model is None:
            return self.get(provider).breaker.state(self._clock())
        target = self.target(provider, model)
        breaker = target.kinds.get(kind, Breaker()) if kind != CHAT else target.breaker
        return breaker.state(self._clock())

    def status(self, provider: str) -> str:
        """'healthy' or 'unhealthy' (open breaker, or never recovered after one) of the provider."""
        return "healthy" if self.get(provider).breaker.is_healthy(self._clock()) else "unhealthy"

    def target_healthy(self, provider: str, model: str) -> bool:
        """The provider's breaker and the model's are both closed (no window running)."""
        now = self._clock()
        return self.get(provider).breaker.is_healthy(now) and self.target(provider, model).breaker.is_healthy(now)

    def ttfb_p95(self, provider: str, model: str, *, stream: bool) -> float | None:
        """The 95th percentile of the target's recent time to first byte (to the answer, unstreamed), at
        most 4 × its median and with each client key's share capped (`latency.py`), or None until
        `TTFB_MIN_SAMPLES` answers of that kind have been seen."""
        return self.target(provider, model).ttfb[stream].estimate()

    def hedge_budget(self, alias: str, percent: float) -> HedgeBudget:
        """The hedge budget of `alias` (a configured alias's name); a new one when its percent changed."""
        budget = self._hedge_budgets.get(alias)
        if budget is None or budget.percent != percent:
            budget = self._hedge_budgets[alias] = HedgeBudget(percent)
        return budget

    def _kept_out_until(self, provider: str, model: str | None) -> float:
        """Monotonic time until which the provider (or, with `model`, that target) is kept out."""
        until = self.get(provider).breaker.unavailable_until()
        if model is not None:
            until = max(until, self.target(provider, model).breaker.unavailable_until())
        return until

    def retry_in(
        self, provider: str, model: str | None = None, kind: str = CHAT, *, lone: bool = False
    ) -> float | None:
        """Seconds until the provider (or, with `model`, that target, for a request of `kind`; `lone`: a lone
        chain entry's) will really be tried again — its next recovery probe or trial, or the end of its rate
        limit — if it is kept out."""
        now = self._clock()
        at = self.get(provider).breaker.retry_at(now, anytime=lone)
        if model is not None:
            at = max(at, self.target(provider, model).retry_at(kind, now, lone=lone))
        return max(0.0, at - now) if at else None

    def retry_unix(
        self, provider: str, model: str | None = None, kind: str = CHAT, *, lone: bool = False
    ) -> float | None:
        """Unix time at which the provider (or, with `model`, that target; `lone`: for a lone chain entry's
        request) will really be tried again — its next recovery probe or trial, or the end of its rate limit
        — if it is kept out."""
        wait = self.retry_in(provider, model, kind, lone=lone)
        return None if wait is None else round(self._wall_clock() + wait, 3)

    def unavailable_until(self, provider: str, model: str | None = None) -> float | None:
        """Unix time until which the provider (or, with `model`, that target) is kept out, if it is."""
        until = self._kept_out_until(provider, model)
        now = self._clock()
        return round(self.unix(until, now), 3) if until > now else None
