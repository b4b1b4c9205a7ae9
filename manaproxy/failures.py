"""The failure taxonomy: what can go wrong with one chain entry, as typed words and named constructors.

Rule of this module: pure (no I/O, no clock but `parse_retry_after`'s for an HTTP date), and the one place that
decides what a failure means. Every reason word manaproxy writes into a log line, a metric label or
`X-Mana-LLM-Attempts` is a member of `Reason` (mypy checks each one), and the words an upstream's HTTP status
makes (`http_503`) are built by `http_reason` alone. Whether a failure lets the chain fall back and whether it
counts against the provider (its `Verdict`), and which breaker counts it (its `scope`), are decided by
`classify_status` and the named constructors of `UpstreamFailure` — table-tested, nowhere else: a provider kind
or the request path picks the constructor that says what happened, never the flags.

The provider kinds translate their exceptions into this taxonomy at their boundary (`providers/base.py`
`translate_errors`, `providers/google/failures.py`); health (`health/tracker.py`) maps a failure onto a
breaker; the request record (`record.py`) keeps it on its `Attempt`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final, Literal, NewType

import orjson
from multidict import CIMultiDictProxy

from .headers import to_client

# -- reason words ---------------------------------------------------------------------------------------------
HttpReason = NewType("HttpReason", str)
"""`http_<status>`: the reason of a failure that is an upstream's HTTP status (`http_reason`)."""

# A target failed before anything reached the client (`UpstreamFailure.reason`).
FailureReason = (
    Literal[
        "connect",  # connecting failed or timed out
        "dns",
        "tls",
        "closed",  # the connection or the stream ended before an answer
        "protocol",  # not HTTP as aiohttp reads it
        "client_error",  # any other aiohttp client error
        "sdk_error",  # an SDK (google-genai) failed in a way of its own
        "timeout",  # no first byte (or, unstreamed, no answer) in time
        "bad_response",  # an answer that cannot be used (invalid JSON, undecodable body ...)
        "too_large",  # past `max_response_bytes` / `max_event_bytes`
        "error_event",  # a 2xx whose first event or body is an error
        "unconfigured",  # the provider has no usable client (no key)
        "unsupported",  # the kind does not serve this endpoint
        "internal",  # a provider module raised something outside this taxonomy (a bug)
        "bad_request",  # the kind found the caller's request wrong before sending it
        "api_key_invalid",  # Google: our key refused (as a 400)
        "failed_precondition",  # Google: nothing can be served from here (location, tier)
    ]
    | HttpReason
)

# A chain entry kept out without a call (`health`, `plan.py`); also fallback metric `reason` values.
UNCONFIGURED: Final = "unconfigured"
UNHEALTHY: Final = "unhealthy"
RATE_LIMITED: Final = "rate_limited"
HALF_OPEN: Final = "half_open"  # the breaker's window is over and a trial request is deciding
SATURATED: Final = "saturated"
SkipReason = Literal["unconfigured", "unhealthy", "rate_limited", "half_open", "saturated"]

# The attempts of a hedged race that was decided: the losers cancelled, and the winner.
HEDGED_LOST: Final = "hedged_lost"
WON: Final = "won"
RaceReason = Literal["hedged_lost", "won"]

Reason = FailureReason | SkipReason | RaceReason
"""Every reason word of an attempt: the log's `attempts=`, `mana_llm_fallback_total{reason}`."""

# How a committed stream failed (`MidStreamFailure.reason`); also stream outcome and error event `code` values.
UPSTREAM_ERROR: Final = "upstream_error"
IDLE_TIMEOUT: Final = "idle_timeout"
SHUTTING_DOWN: Final = "shutting_down"  # the shutdown drain ran out of time (`drain.py`)
MidStreamReason = Literal["upstream_error", "idle_timeout", "shutting_down"]


def http_reason(status: int) -> HttpReason:
    """The reason word of an upstream's HTTP status: `http_503`."""
    return HttpReason(f"http_{status}")


# -- what a failure means -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verdict:
    """What a failure means for the chain walk."""

    fallback: bool  # try the next chain entry
    provider_fault: bool  # count against the provider's health


FAULT = Verdict(fallback=True, provider_fault=True)  # the target failed: the next entry, and it counts
PASS_ON = Verdict(fallback=True, provider_fault=False)  # not served there, nothing broken: the next entry
CALLERS = Verdict(fallback=False, provider_fault=False)  # the caller's request is wrong: it goes back as is


def classify_status(status: int) -> Verdict:
    """Fall back on 3xx/401/403/404/408/425/429/5xx; other 4xx are the caller's fault and go back as is.

    401/403 may mean *our* provider credentials are wrong, or that this model or this request is refused
    (a model the account may not use, a moderation refusal): a fault either way, whose scope a probe with
    our key decides (`CREDENTIALS`, see `health/tracker.py`). 404 means the model is not served there: fall
    back, but the provider itself is fine.
    """
    if status >= 500 or status in (401, 403, 408, 425, 429) or 300 <= status < 400:
        # 3xx: redirects are never followed (they would carry our provider headers elsewhere).
        return FAULT
    if status == 404:
        return PASS_ON
    return CALLERS


# What a failure says is broken, and so which breaker counts it (`health/tracker.py`).
PROVIDER: Final = "provider"  # the upstream as a whole: connect/DNS/TLS errors, a reset before headers
TARGET: Final = "target"  # one model there: HTTP errors, timeouts waiting for it, Retry-After windows, bad answers
# 401/403: our key refused (the provider's) or this model or request refused (not health at all). Which one,
# a probe of the provider with our key decides; a request's 401/403 alone never opens a breaker.
CREDENTIALS: Final = "credentials"
Scope = Literal["provider", "target", "credentials"]

# Failures of the upstream as a whole (scope `PROVIDER`).
ProviderReason = Literal["connect", "dns", "tls", "closed", "protocol", "client_error", "sdk_error"]


class UpstreamFailure(Exception):
    """A target failed before anything reached the client.

    Made by the named constructors below (each says what happened, and so its verdict and scope); the
    initializer takes them spelled out for the rare caller that must (a test's deliberately faulty kind).
    """

    def __init__(
        self,
        reason: FailureReason,
        detail: str,
        *,
        verdict: Verdict,
        scope: Scope,
        status: int | None = None,
        retry_after: float | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        shaped: bool = False,
        headers: list[tuple[str, str]] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason  # short stable word for logs and metrics
        self.detail = detail  # short, sanitized human text (never a key or a full upstream body)
        self.fallback = verdict.fallback
        self.provider_fault = verdict.provider_fault
        self.scope = scope
        self.status = status
        self.retry_after = retry_after
        self.body = body  # the upstream's error body, relayed when we do not fall back
        self.content_type = content_type
        self.shaped = shaped  # `body` is an OpenAI-shaped error (else the proxy wraps `detail` in one)
        self.headers = headers or []  # the upstream's response headers, for the client, when relayed
        self.error = error  # the upstream's OpenAI-shaped error object, when it sent one

    def __repr__(self) -> str:
        return f"UpstreamFailure({self.reason!r}, {self.detail!r}, fallback={self.fallback})"

    @property
    def summary(self) -> str:
        """How this failure reads in a 503's entry list and `X-Mana-LLM-Attempts`: `HTTP 500`, `timeout` ..."""
        return f"HTTP {self.status}" if self.status is not None else self.reason

    # -- an upstream's HTTP answer ------------------------------------------------------------------------
    @classmethod
    def from_status(
        cls, status: int, headers: CIMultiDictProxy[str] | Mapping[str, str], body: bytes, content_type: str | None
    ) -> UpstreamFailure:
        """An upstream's error status, as `classify_status` reads it; its body and headers kept for relaying."""
        retry_after = rate_limit_hint(headers.items()) if status == 429 else None  # any hint it gave
        excerpt, error = _read_error(body)
        return cls(
            http_reason(status),
            f"HTTP {status}{excerpt}",
            verdict=classify_status(status),
            # 401/403 refuse our credentials (the provider's, whatever the model), or only this model or request.
            scope=CREDENTIALS if status in (401, 403) else TARGET,
            status=status,
            retry_after=retry_after,
            body=body,
            content_type=content_type,
            shaped=error is not None,
            headers=to_client(headers),
            error=error,
        )

    @classmethod
    def credentials_refused(cls, detail: str, body: bytes) -> UpstreamFailure:
        """Our key refused, unmistakably (Google answers a wrong or expired key with a 400 `API_KEY_INVALID`):
        nothing there can answer until it is fixed, whatever the request."""
        return cls("api_key_invalid", detail, verdict=FAULT, scope=PROVIDER, status=400, body=body)

    @classmethod
    def failed_precondition(cls, detail: str, body: bytes) -> UpstreamFailure:
        """The provider cannot serve anyone from here (Google's 400 `FAILED_PRECONDITION`: an unsupported
        location, a free tier unavailable), whatever the request; another chain entry may."""
        return cls("failed_precondition", detail, verdict=FAULT, scope=PROVIDER, status=400, body=body)

    @classmethod
    def caller_error(cls, detail: str, body: bytes) -> UpstreamFailure:
        """The caller's request is wrong, found by the kind before sending it (a 400 with an OpenAI-shaped
        `body`): it goes back as is, and says nothing about the provider."""
        return cls(
            "bad_request",
            detail,
            verdict=CALLERS,
            scope=TARGET,
            status=400,
            body=body,
            content_type="application/json",
            shaped=True,
        )

    # -- the upstream as a whole ------------------------------------------------------------------------
    @classmethod
    def provider_failed(cls, reason: ProviderReason, detail: str) -> UpstreamFailure:
        """The upstream as a whole failed: connect, DNS, TLS, a connection closed or garbled before an
        answer, an SDK failing on its own; every model there is suspect."""
        return cls(reason, detail, verdict=FAULT, scope=PROVIDER)

    @classmethod
    def unconfigured(cls, detail: str, *, configured: bool) -> UpstreamFailure:
        """The provider has no usable client. Left unconfigured on purpose (no key) it is passed over and
        nothing is broken; `configured` and still without a client, it is broken."""
        return cls("unconfigured", detail, verdict=FAULT if configured else PASS_ON, scope=PROVIDER)

    # -- one target -------------------------------------------------------------------------------------
    @classmethod
    def timeout(cls, detail: str) -> UpstreamFailure:
        """No first byte (unstreamed: no answer, a probe: no verdict) in time."""
        return cls("timeout", detail, verdict=FAULT, scope=TARGET)

    @classmethod
    def ended_early(cls, detail: str) -> UpstreamFailure:
        """The target answered 2xx and ended its stream before its first event."""
        return cls("closed", detail, verdict=FAULT, scope=TARGET)

    @classmethod
    def bad_response(cls, detail: str, *, status: int | None = None) -> UpstreamFailure:
        """An answer that cannot be used: invalid JSON, an undecodable body, an unexpected shape or status.
        `status`: what a lone entry's failure answers the client (502 for a status outside HTTP's)."""
        return cls("bad_response", detail, verdict=FAULT, scope=TARGET, status=status)

    @classmethod
    def too_large(cls, detail: str) -> UpstreamFailure:
        """An answer past `max_response_bytes`, or a first event past `max_event_bytes`."""
        return cls("too_large", detail, verdict=FAULT, scope=TARGET)

    @classmethod
    def error_event(cls, detail: str) -> UpstreamFailure:
        """A 2xx whose first event (or whole body) is an error."""
        return cls("error_event", detail, verdict=FAULT, scope=TARGET)

    @classmethod
    def unsupported(cls, detail: str) -> UpstreamFailure:
        """The kind does not serve this endpoint: the next entry may; nothing is broken."""
        return cls("unsupported", detail, verdict=PASS_ON, scope=TARGET)

    @classmethod
    def internal(cls, detail: str, *, probe: bool = False) -> UpstreamFailure:
        """A provider module raised something outside this taxonomy (a bug of ours). A request falls back
        without blaming the upstream; a probe that could not tell the provider works counts as failed."""
        return cls("internal", detail, verdict=FAULT if probe else PASS_ON, scope=TARGET)


class MidStreamFailure(Exception):
    """A committed stream failed; it is ended with an error event. Raised by the kinds as the upstream's
    failure (`upstream_error`, `idle_timeout`); the request path makes its own (`relay_error`,
    `shutting_down`), which are not the provider's fault."""

    def __init__(self, reason: MidStreamReason, detail: str, *, provider_fault: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.provider_fault = provider_fault  # count against the target's health

    @classmethod
    def relay_error(cls) -> MidStreamFailure:
        """Relaying failed on our side (a bug): the stream ends with an error, the target is not blamed."""
        return cls(UPSTREAM_ERROR, "internal error while relaying", provider_fault=False)

    @classmethod
    def shutting_down(cls) -> MidStreamFailure:
        """The shutdown drain ran out of time: the stream is ended cleanly rather than cut."""
        return cls(SHUTTING_DOWN, "manaproxy is shutting down", provider_fault=False)


# -- reading an upstream's error ------------------------------------------------------------------------------
def _read_error(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """(a short excerpt of an upstream error body's message, for logs and our own texts; the body's error
    object when it is OpenAI-shaped, so that it can go to the client as it is)."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(data, dict):
        return "", None
    err = data.get("error", data)
    message = err.get("message") if isinstance(err, dict) else err
    excerpt = ""
    if isinstance(message, str) and message:
        message = " ".join(message.split())
        excerpt = ": " + (message if len(message) <= 120 else message[:117] + "...")
    error = data.get("error")
    return excerpt, error if isinstance(error, dict) else None


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = moment.timestamp() - time.time()
    if seconds != seconds or seconds <= 0:
        return None
    return min(seconds, 3600.0)


# OpenAI's and Groq's `x-ratelimit-reset-*` durations: `6m0s`, `1.5s`, `20ms`, `1h2m3.5s`.
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")


def parse_duration(value: str) -> float | None:
    """`6m0s`, `1.5s`, `20ms`, or plain seconds (`2`, `0.5`) as seconds; None when unusable."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        match = _DURATION_RE.fullmatch(value)
        if match is None or not value:
            return None
        hours, minutes, secs, millis = (float(part) if part else 0.0 for part in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs + millis / 1000
    if seconds != seconds or seconds <= 0:
        return None
    return min(seconds, 3600.0)


def rate_limit_hint(headers: Iterable[tuple[str, str]]) -> float | None:
    """How long a 429 says to wait, in seconds, from its headers: `retry-after-ms` (Azure's; the SDKs prefer
    it), else `Retry-After` (seconds or an HTTP date), else the `x-ratelimit-reset-*` of a limit that is used
    up (its `x-ratelimit-remaining-*` is 0) or, when none says so, the longest of them. None: no hint."""
    lower = {name.lower(): value for name, value in headers}
    millis = lower.get("retry-after-ms")
    if millis is not None:
        try:
            seconds = float(millis) / 1000
        except ValueError:
            seconds = float("nan")
        if seconds == seconds and seconds > 0:
            return min(seconds, 3600.0)
    seconds_after = parse_retry_after(lower.get("retry-after"))
    if seconds_after is not None:
        return seconds_after
    resets = {
        name[len("x-ratelimit-reset-") :]: value
        for name, value in lower.items()
        if name.startswith("x-ratelimit-reset-")
    }
    waits = {name: parse_duration(value) for name, value in resets.items()}
    used_up = [
        wait
        for name, wait in waits.items()
        if wait is not None and lower.get(f"x-ratelimit-remaining-{name}", "").strip() == "0"
    ]
    known = used_up or [wait for wait in waits.values() if wait is not None]
    return max(known) if known else None
