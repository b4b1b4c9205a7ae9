"""What one proxied request did, recorded once when it ends.

The request path fills a `RequestRecord` as it goes and hands it, once, to every observer: the request
log line (`reqlog.py`) and the metrics (`metrics.py`). Observers never run per chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Stream outcomes (also metric label values).
COMPLETED = "completed"
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_ERROR = "upstream_error"
IDLE_TIMEOUT = "idle_timeout"

# Hedged races: which attempt won (metric `outcome` values), and the attempts that lost (a reason word).
PRIMARY_WON = "primary_won"
HEDGE_WON = "hedge_won"
HEDGED_LOST = "hedged_lost"
WON = "won"

# What separates the items of an attempts record and the parts of one (`,` `=` `:`), and the escape itself.
_ITEM_ESCAPES = str.maketrans({"%": "%25", ",": "%2C", "=": "%3D", ":": "%3A"})
_KEPT_COLONS = str.maketrans({"%": "%25", ",": "%2C", "=": "%3D"})


def attempt_item(text: str, *, colons: bool = True) -> str:
    """`text` (a target, a reason) made safe as one part of one item of an attempts record: `%`, `,`, `=`
    and `:` percent-encoded, so a model named `up/status:500,up/ok:won` cannot forge items. `colons=False`
    keeps `:` for a target whose record reads its reason after the last `:` (Ollama's `qwen2.5:7b`)."""
    return text.translate(_ITEM_ESCAPES if colons else _KEPT_COLONS)


@dataclass(slots=True)
class Attempt:
    """One chain entry that was skipped or tried and failed (the one that answered is `record.target`)."""

    target: str  # provider/model
    provider: str
    reason: str  # short stable word: unhealthy, unconfigured, saturated, rate_limited, timeout, connect, http_503 ...
    detail: str = ""
    tried: bool = True  # False when skipped without a call
    status: int | None = None  # the upstream's HTTP status, when it answered one
    retry_after: float | None = None  # seconds until it may be tried again (Retry-After, breaker window)
    error: dict[str, object] | None = None  # the upstream's OpenAI-shaped error object, when it sent one
    headers: list[tuple[str, str]] = field(default_factory=list)  # the upstream's headers, for the client
    # Skipped while kept out: the HTTP status of the entry's last failure (`error`, `headers` are that answer's);
    # a lone entry kept out answers with it (`proxy.exhausted`).
    last_status: int | None = None

    @property
    def summary(self) -> str:
        """How the attempt reads in a 503's entry list: `HTTP 500`, `timeout`, `unhealthy` ..."""
        return f"HTTP {self.status}" if self.status is not None else self.reason

    @property
    def logged(self) -> str:
        """How the attempt reads in the log's `attempts=`: `target:reason`, the reason after the last `:`."""
        return f"{attempt_item(self.target, colons=False)}:{attempt_item(self.reason)}"

    @property
    def listed(self) -> str:
        """How the attempt reads in `X-Mana-LLM-Attempts` and a 503's message: `target=summary`."""
        return f"{attempt_item(self.target, colons=False)}={attempt_item(self.summary)}"


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str  # the route path, e.g. /v1/chat/completions
    requested: str = ""  # the model the client asked for (unbounded: never a metric label as is)
    alias: str | None = None  # configured alias used, if any
    provider: str | None = None  # provider that answered
    target: str | None = None  # provider/model that answered
    requested_provider: str | None = None  # configured provider named by the request (for error labels)
    streaming: bool = False
    status: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    calls: list[str] = field(
        default_factory=list
    )  # provider/model of every call started, in order (the last in flight)
    error_type: str | None = None  # short word when the request failed: all_failed, upstream_4xx, bad_request ...
    outcome: str | None = None  # for committed streams: completed / client_disconnected / upstream_error / idle_timeout
    hedge: str | None = None  # a hedged race took place: primary_won / hedge_won
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = 0.0  # perf_counter
    first_byte: float | None = None  # seconds from start to the first byte sent to the client
    duration: float = 0.0
    upstream_wait: float = 0.0  # seconds spent waiting on upstreams
    client_wait: float = 0.0  # seconds spent reading the client's body and writing to a slow client

    @property
    def overhead(self) -> float:
        """Time spent in manaproxy itself: everything but waiting on the upstream or the client."""
        return max(0.0, self.duration - self.upstream_wait - self.client_wait)


Observer = Callable[[RequestRecord], None]
