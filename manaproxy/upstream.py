"""The boundary with upstream providers: what a call is, what can come back, and how failures classify.

Every exception from talking to an upstream is translated once, here, into an `UpstreamFailure` with a
short stable `reason` (`connect`, `timeout`, `http_503`, ...). Whether that failure lets the proxy fall
back to the next chain entry, and whether it counts against the provider's health, is decided by the
pure function `classify_status` / the constructors below — table-tested, nowhere else.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, Awaitable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson

from .config import ProviderConfig

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an upstream HTTP status means for the chain walk."""

    fallback: bool  # try the next chain entry
    provider_fault: bool  # count against the provider's health


def classify_status(status: int) -> Verdict:
    """Fall back on 3xx/401/403/404/408/425/429/5xx; other 4xx are the caller's fault and go back as is.

    401/403 mean *our* provider credentials are wrong: a provider failure. 404 means the model is not
    served there: fall back, but the provider itself is fine.
    """
    if status >= 500 or status in (401, 403, 408, 425, 429) or 300 <= status < 400:
        # 3xx: redirects are never followed (they would carry our provider headers elsewhere).
        return Verdict(fallback=True, provider_fault=True)
    if status == 404:
        return Verdict(fallback=True, provider_fault=False)
    return Verdict(fallback=False, provider_fault=False)


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

    def __repr__(self) -> str:
        return f"UpstreamFailure({self.reason!r}, {self.detail!r}, fallback={self.fallback})"

    @property
    def summary(self) -> str:
        """How this failure reads in a 503's entry list: `HTTP 500`, `timeout`, `connect` ..."""
        return f"HTTP {self.status}" if self.status is not None else self.reason

    @classmethod
    def from_status(
        cls, status: int, headers: Mapping[str, str], body: bytes, content_type: str | None
    ) -> UpstreamFailure:
        verdict = classify_status(status)
        retry_after = parse_retry_after(headers.get("Retry-After")) if status == 429 else None
        return cls(
            f"http_{status}",
            f"HTTP {status}{_error_message(body)}",
            fallback=verdict.fallback,
            provider_fault=verdict.provider_fault,
            status=status,
            retry_after=retry_after,
            body=body,
            content_type=content_type,
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


def _error_message(body: bytes) -> str:
    """A short excerpt of an upstream error body's message, for logs and our own 503 text."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(data, dict):
        err = data.get("error", data)
        message = err.get("message") if isinstance(err, dict) else err
        if isinstance(message, str) and message:
            message = " ".join(message.split())
            return ": " + (message if len(message) <= 120 else message[:117] + "...")
    return ""


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
        import time

        seconds = moment.timestamp() - time.time()
    if seconds != seconds or seconds <= 0:
        return None
    return min(seconds, 3600.0)


@contextmanager
def translate_errors(phase: str) -> Iterator[None]:
    """Map client exceptions to `UpstreamFailure` (httpcore's map_exceptions, for one call site)."""
    try:
        yield
    except TimeoutError:
        raise UpstreamFailure("timeout", f"timed out {phase}") from None
    except aiohttp.ClientConnectorDNSError as exc:
        raise UpstreamFailure("dns", f"DNS lookup failed: {exc.host}") from None
    except (aiohttp.ClientSSLError, ssl.SSLError):
        raise UpstreamFailure("tls", "TLS handshake failed") from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure(
            "connect", f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
        ) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError):
        raise UpstreamFailure("closed", f"upstream closed the connection {phase}") from None
    except aiohttp.ClientResponseError as exc:
        raise UpstreamFailure("protocol", f"bad response {phase}: {exc.message}") from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure("client_error", f"{type(exc).__name__} {phase}") from None


@dataclass(frozen=True, slots=True)
class Call:
    """One attempt at one target, as handed to a provider."""

    path: str  # path after /v1, e.g. "/chat/completions"
    payload: dict[str, Any]  # the parsed client request body (its `model` is the client's)
    model: str  # the provider-local model name to send instead
    stream: bool
    request_id: str
    accept: str | None
    # `payload` without `model`, JSON-encoded once per request (None: encode `payload` here).
    body_without_model: bytes | None = None

    def body_for(self, model: str) -> bytes:
        """The JSON body to send upstream: the client's, with `model` replaced."""
        rest = self.body_without_model
        if rest is None:
            return orjson.dumps({**self.payload, "model": model})
        head = b'{"model":' + orjson.dumps(model)
        return head + b"}" if rest == b"{}" else head + b"," + rest[1:]


@dataclass(slots=True)
class Reply:
    """A complete, non-streamed upstream answer (2xx)."""

    status: int
    body: bytes
    content_type: str


class StreamReply(Protocol):
    """An upstream SSE stream whose first data event has arrived (so the target answered)."""

    status: int
    first: bytes  # complete SSE events up to and including the first data event

    def events(self) -> AsyncGenerator[bytes, None]:
        """Remaining raw bytes, cut at event boundaries; raises `MidStreamFailure` on failure."""
        ...

    def close(self, *, complete: bool) -> None:
        """Release the upstream connection: back to the pool when `complete`, else torn down now."""
        ...


class Provider(Protocol):
    """One provider kind (openai passthrough, google translation)."""

    config: ProviderConfig

    async def send(self, call: Call) -> Reply | StreamReply:
        """Send `call`; raise `UpstreamFailure` if it fails before its first event (or, unstreamed, at all)."""
        ...

    async def list_models(self, timeout: float) -> list[str]:
        """Model ids the provider serves (for /v1/models); raises on failure."""
        ...

    async def probe(self, timeout: float) -> None:
        """A health check that spends no tokens; raises `UpstreamFailure` when unhealthy."""
        ...
