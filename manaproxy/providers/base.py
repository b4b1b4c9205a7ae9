"""The contract between the request path and the provider kinds.

A provider gets a `Call` — the client's request body (parsed once, `body.py`), the path under its
`base_url` and the `Target` to serve — and answers with **client-ready bytes**: a `Reply` or a
`StreamReply` whose `model` already names the resolved target, whose usage it has counted and whose
completeness it has judged. Before anything reaches the client it raises `UpstreamFailure`; after the
commit point a stream raises `MidStreamFailure`.

Every exception from an upstream is translated once into this taxonomy, with a short stable `reason`
(`connect`, `timeout`, `http_503` ...). Whether a failure lets the chain fall back and whether it counts
against the provider is decided by `classify_status` and the constructors below — table-tested, nowhere
else. The request path imports this module and nothing else of `providers/`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from ..body import Body
from ..config import ProviderConfig, Target
from ..headers import to_client
from ..protocols import CHAT, StreamProtocol

Usage = tuple[int, int]  # (prompt tokens, completion tokens)
ListedModel = tuple[str, int | None]  # (model id, its `created` unix time when the upstream gave one)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an upstream HTTP status means for the chain walk."""

    fallback: bool  # try the next chain entry
    provider_fault: bool  # count against the provider's health


def classify_status(status: int) -> Verdict:
    """Fall back on 3xx/401/403/404/408/425/429/5xx; other 4xx are the caller's fault and go back as is.

    401/403 may mean *our* provider credentials are wrong, or that this model or this request is refused
    (a model the account may not use, a moderation refusal): a fault either way, whose scope a probe with
    our key decides (`CREDENTIALS`, see `health/tracker.py`). 404 means the model is not served there: fall
    back, but the provider itself is fine.
    """
    if status >= 500 or status in (401, 403, 408, 425, 429) or 300 <= status < 400:
        # 3xx: redirects are never followed (they would carry our provider headers elsewhere).
        return Verdict(fallback=True, provider_fault=True)
    if status == 404:
        return Verdict(fallback=True, provider_fault=False)
    return Verdict(fallback=False, provider_fault=False)


# What a failure says is broken, and so which breaker counts it (`health/tracker.py`).
PROVIDER = "provider"  # the upstream as a whole: connect/DNS/TLS errors, a reset before headers
TARGET = "target"  # one model there: HTTP errors, timeouts waiting for it, Retry-After windows, bad answers
# 401/403: our key refused (the provider's) or this model or request refused (not health at all). Which one,
# a probe of the provider with our key decides; a request's 401/403 alone never opens a breaker.
CREDENTIALS = "credentials"


class UpstreamFailure(Exception):
    """A target failed before anything reached the client."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        fallback: bool = True,
        provider_fault: bool = True,
        status: int | None = None,
        retry_after: float | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        shaped: bool = False,
        headers: list[tuple[str, str]] | None = None,
        scope: str = TARGET,
        error: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason  # short stable word for logs and metrics
        self.detail = detail  # short, sanitized human text (never a key or a full upstream body)
        self.fallback = fallback
        self.provider_fault = provider_fault
        self.status = status
        self.retry_after = retry_after
        self.body = body  # the upstream's error body, relayed when we do not fall back
        self.content_type = content_type
        self.shaped = shaped  # `body` is an OpenAI-shaped error (else the proxy wraps `detail` in one)
        self.headers = headers or []  # the upstream's response headers, for the client, when relayed
        self.scope = scope  # PROVIDER, TARGET or CREDENTIALS
        self.error = error  # the upstream's OpenAI-shaped error object, when it sent one

    def __repr__(self) -> str:
        return f"UpstreamFailure({self.reason!r}, {self.detail!r}, fallback={self.fallback})"

    @property
    def summary(self) -> str:
        """How this failure reads in a 503's entry list: `HTTP 500`, `timeout`, `connect` ..."""
        return f"HTTP {self.status}" if self.status is not None else self.reason

    @classmethod
    def from_status(
        cls, status: int, headers: CIMultiDictProxy[str] | Mapping[str, str], body: bytes, content_type: str | None
    ) -> UpstreamFailure:
        verdict = classify_status(status)
        retry_after = parse_retry_after(headers.get("Retry-After")) if status == 429 else None
        excerpt, error = _read_error(body)
        # 401/403 refuse our credentials (the provider's, whatever the model), or only this model or request.
        scope = CREDENTIALS if status in (401, 403) else TARGET
        return cls(
            f"http_{status}",
            f"HTTP {status}{excerpt}",
            fallback=verdict.fallback,
            provider_fault=verdict.provider_fault,
            status=status,
            retry_after=retry_after,
            body=body,
            content_type=content_type,
            shaped=error is not None,
            headers=to_client(headers),
            scope=scope,
            error=error,
        )


class MidStreamFailure(Exception):
    """The upstream failed after the commit point; the stream is ended with an error event."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # "upstream_error" | "idle_timeout"
        self.detail = detail


async def within_idle(read: Awaitable[T], idle: float, upstream: str) -> T:
    """One read from a committed stream, bounded by the idle gap; timeouts become `MidStreamFailure`.

    A `TimeoutError` that is not ours comes from the client's total timeout (aiohttp's ClientTimeout).
    """
    idle_timer = asyncio.timeout(idle)
    try:
        async with idle_timer:
            return await read
    except TimeoutError:
        if idle_timer.expired():
            raise MidStreamFailure("idle_timeout", f"no data from {upstream} for {idle:g}s") from None
        raise MidStreamFailure("upstream_error", f"{upstream} exceeded its total timeout") from None


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


@contextmanager
def translate_errors(phase: str) -> Iterator[None]:
    """Map client exceptions to `UpstreamFailure` (httpcore's map_exceptions, for one call site)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamFailure("connect", f"timed out connecting {phase}", scope=PROVIDER) from None
    except TimeoutError:  # waiting for the model's first byte or answer
        raise UpstreamFailure("timeout", f"timed out {phase}") from None
    except aiohttp.ClientConnectorDNSError as exc:
        raise UpstreamFailure("dns", f"DNS lookup failed: {exc.host}", scope=PROVIDER) from None
    except (aiohttp.ClientSSLError, ssl.SSLError):
        raise UpstreamFailure("tls", "TLS handshake failed", scope=PROVIDER) from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure(
            "connect",
            f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}",
            scope=PROVIDER,
        ) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError):
        raise UpstreamFailure("closed", f"upstream closed the connection {phase}", scope=PROVIDER) from None
    except aiohttp.ClientResponseError as exc:
        raise UpstreamFailure("protocol", f"bad response {phase}: {exc.message}", scope=PROVIDER) from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure("client_error", f"{type(exc).__name__} {phase}", scope=PROVIDER) from None


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt at one target, as handed to a provider."""

    path: str  # path after /v1, checked by `paths.upstream_path` (e.g. "/chat/completions?x=1")
    body: Body  # the client's request, parsed once (JSON, or a multipart form)
    target: Target  # the provider's own model name is `target.model`; the client sees `str(target)`
    request_id: str
    accept: str | None
    protocol: StreamProtocol = CHAT  # how a stream of this endpoint ends (`protocols.for_path`)
    headers: Mapping[str, str] = field(default_factory=dict)  # the client's request headers, as received

    @property
    def stream(self) -> bool:
        return self.body.stream


@dataclass(slots=True)
class Reply:
    """A complete, unstreamed answer (2xx), ready for the client."""

    status: int
    body: bytes
    content_type: str
    usage: Usage | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)  # the upstream's, for the client (`headers.py`)


class StreamReply(Protocol):
    """A streamed answer whose first data event has arrived (so the target answered), ready for the client."""

    status: int
    headers: list[tuple[str, str]]  # the upstream's, for the client (`headers.py`)
    first: bytes  # complete SSE events up to and including the first data event
    # The protocol's end went by (`data: [DONE]` for chat, `response.completed` ...; for other endpoints a
    # normal end of body): the answer is whole even if the connection then fails. Read after `events()`.
    complete: bool
    usage: Usage | None  # tokens, once a usage event went by

    def events(self) -> AsyncGenerator[bytes, None]:
        """The rest of the answer, cut at event boundaries; raises `MidStreamFailure` on failure."""
        ...

    def close(self, *, reuse: bool) -> None:
        """Release the upstream connection: back to the pool when `reuse`, else torn down now (so the
        provider stops generating)."""
        ...


class Provider(Protocol):
    """One provider kind (openai passthrough, google translation); see `config.KINDS`."""

    config: ProviderConfig

    async def send(self, call: Call) -> Reply | StreamReply:
        """Send `call`; raise `UpstreamFailure` if it fails before its first event (or, unstreamed, at all)."""
        ...

    async def list_models(self, timeout: float) -> list[ListedModel]:
        """Models the provider serves (for /v1/models); raises on failure."""
        ...

    async def probe(self, timeout: float) -> None:
        """A health check that spends no tokens; raises `UpstreamFailure` when unhealthy."""
        ...
