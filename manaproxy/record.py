"""What one proxied request did, recorded once when it ends.

The request path fills a `RequestRecord` as it goes and hands it, once, to every observer: the request
log line (`reqlog.py`) and the metrics (`metrics.py`). Observers never run per chunk. The record holds
what the request path had in hand — `Target`s, each failed attempt's `UpstreamFailure` — and each observer
renders it (`str(target)`, the failure's `reason` word and `summary`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import Target
from .failures import Reason, SkipReason, UpstreamFailure

# Stream outcomes (also metric label values): the two below, and how a committed stream failed
# (`failures.MidStreamReason`: `upstream_error`, `idle_timeout`, `shutting_down`).
COMPLETED = "completed"
CLIENT_DISCONNECTED = "client_disconnected"

# Hedged races: which attempt won (metric `outcome` values). The attempts of the race are `failures.RaceReason`s.
PRIMARY_WON = "primary_won"
HEDGE_WON = "hedge_won"

# What separates the items of an attempts record and the parts of one (`,` `=` `:`), and the escape itself.
_ITEM_ESCAPES = str.maketrans({"%": "%25", ",": "%2C", "=": "%3D", ":": "%3A"})
_KEPT_COLONS = str.maketrans({"%": "%25", ",": "%2C", "=": "%3D"})


def attempt_item(text: str, *, colons: bool = True) -> str:
    """`text` (a target, a reason) made safe as one part of one item of an attempts record: `%`, `,`, `=`
    and `:` percent-encoded, so a model named `up/status:500,up/ok:won` cannot forge items. `colons=False`
    keeps `:` for a target whose record reads its reason after the last `:` (Ollama's `qwen2.5:7b`)."""
    return text.translate(_ITEM_ESCAPES if colons else _KEPT_COLONS)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One chain entry that was skipped, raced, or tried and failed (the one that answered is `record.target`)."""

    target: Target
    reason: Reason  # short stable word: unhealthy, saturated, hedged_lost, timeout, connect, http_503 ...
    failure: UpstreamFailure | None = None  # what the upstream did, when it was tried and failed
    tried: bool = True  # False when skipped without a call
    wait: float | None = None  # skipped: seconds until it is really tried again (next probe or trial, Retry-After)
    # Skipped while its breaker keeps it out: the entry's last failure; a lone entry kept out answers with it
    # (`proxy.exhausted`), as the SDK's retry would have met it direct.
    last: UpstreamFailure | None = None

    @classmethod
    def failed(cls, target: Target, failure: UpstreamFailure) -> Attempt:
        return cls(target, failure.reason, failure)

    @classmethod
    def skipped(
        cls, target: Target, reason: SkipReason, wait: float | None, last: UpstreamFailure | None = None
    ) -> Attempt:
        return cls(target, reason, tried=False, wait=wait, last=last)

    @property
    def status(self) -> int | None:
        """The upstream's HTTP status, when it answered one."""
        return self.failure.status if self.failure is not None else None

    @property
    def retry_after(self) -> float | None:
        """Seconds until the entry may be tried again: its breaker window, or the upstream's Retry-After."""
        return self.failure.retry_after if self.failure is not None else self.wait

    @property
    def logged(self) -> str:
        """How the attempt reads in the log's `attempts=`: `target:reason`, the reason after the last `:`."""
        return f"{attempt_item(str(self.target), colons=False)}:{attempt_item(self.reason)}"

    @property
    def listed(self) -> str:
        """How the attempt reads in `X-Mana-LLM-Attempts` and a 503's message: `target=summary`, the summary
        the failure's (`HTTP 500`, `timeout`), else the reason (`unhealthy`)."""
        summary = self.failure.summary if self.failure is not None else self.reason
        return f"{attempt_item(str(self.target), colons=False)}={attempt_item(summary)}"


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str  # the route path, e.g. /v1/chat/completions
    requested: str = ""  # the model the client asked for (unbounded: never a metric label as is)
    alias: str | None = None  # configured alias used, if any
    target: Target | None = None  # what answered (or relayed the caller's error)
    requested_provider: str | None = None  # configured provider named by the request (for error labels)
    streaming: bool = False
    status: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    calls: list[Target] = field(default_factory=list)  # every call started, in order (the last in flight)
    error_type: str | None = None  # short word when the request failed: all_failed, upstream_4xx, bad_request ...
    outcome: str | None = None  # for committed streams: completed / client_disconnected / upstream_error / idle_timeout
    hedge: str | None = None  # a hedged race took place: primary_won / hedge_won
    cache: str | None = None  # a request of a caching alias: hit / miss / bypass / error (`cache.py`)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = 0.0  # perf_counter
    first_byte: float | None = None  # seconds from start to the first byte sent to the client
    duration: float = 0.0
    upstream_wait: float = 0.0  # seconds spent waiting on upstreams
    client_wait: float = 0.0  # seconds spent reading the client's body and writing to a slow client
    client: str = "anonymous"  # the client's name (`auth.Identity`; never a key)

    @property
    def overhead(self) -> float:
        """Time spent in manaproxy itself: everything but waiting on the upstream or the client."""
        return max(0.0, self.duration - self.upstream_wait - self.client_wait)


Observer = Callable[[RequestRecord], None]
