"""The contract between the request path and the provider kinds.

A provider gets a `Call` — the client's request body (parsed once, `body.py`), the path under its
`base_url` and the `Target` to serve — and answers with **client-ready bytes**: a `Reply` or a
`StreamReply` whose `model` already names the resolved target, whose usage it has counted and whose
completeness it has judged. Before anything reaches the client it raises `UpstreamFailure`; after the
commit point a stream raises `MidStreamFailure`.

Every exception from an upstream is translated once into the failure taxonomy (`failures.py`, re-exported
here), with a short stable `reason` (`connect`, `timeout`, `http_503` ...): `translate_errors` below for the
transport, the named constructors of `UpstreamFailure` for the rest. The request path imports this module
and nothing else of `providers/`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncGenerator, Awaitable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiohttp

from ..body import Body
from ..config import ProviderConfig, Target
from ..failures import MidStreamFailure as MidStreamFailure  # re-exported: what a kind raises
from ..failures import UpstreamFailure as UpstreamFailure
from ..protocols import CHAT, StreamProtocol

Usage = tuple[int, int]  # (prompt tokens, completion tokens)
ListedModel = tuple[str, int | None]  # (model id, its `created` unix time when the upstream gave one)

T = TypeVar("T")


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


@contextmanager
def translate_errors(phase: str) -> Iterator[None]:
    """Map client exceptions to `UpstreamFailure` (httpcore's map_exceptions, for one call site)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError:
        raise UpstreamFailure.provider_failed("connect", f"timed out connecting {phase}") from None
    except TimeoutError:  # waiting for the model's first byte or answer
        raise UpstreamFailure.timeout(f"timed out {phase}") from None
    except aiohttp.ClientConnectorDNSError as exc:
        raise UpstreamFailure.provider_failed("dns", f"DNS lookup failed: {exc.host}") from None
    except (aiohttp.ClientSSLError, ssl.SSLError):
        raise UpstreamFailure.provider_failed("tls", "TLS handshake failed") from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamFailure.provider_failed(
            "connect", f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
        ) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError, ConnectionError):
        raise UpstreamFailure.provider_failed("closed", f"upstream closed the connection {phase}") from None
    except aiohttp.ClientResponseError as exc:
        raise UpstreamFailure.provider_failed("protocol", f"bad response {phase}: {exc.message}") from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure.provider_failed("client_error", f"{type(exc).__name__} {phase}") from None


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
    """One provider kind (openai passthrough, google translation); see `config.KINDS`.

    Made by `build_provider(config, session, redactor, server)`. What every kind owes the request path —
    and what `tests/test_provider_contract.py` runs against every kind alike (a new kind joins that suite's
    parametrisation and passes it before it ships):

    - **Client-ready answers.** `send` returns a `Reply` or a `StreamReply` whose bytes go to the client as
      they are: their `model` is the resolved target (`str(call.target)`), never the upstream's name; their
      usage is counted (`usage`: what `mana_llm_tokens_total` and the request log line report); a stream
      knows whether its protocol's end went by (`complete`).
    - **Bounded answers** (the `server` settings it was built with). An unstreamed answer larger than
      `server.max_response_bytes`, or a stream whose first event is larger than `server.max_event_bytes`,
      fails the attempt before anything reached the client (`UpstreamFailure` with `too_large`, which falls
      back: the chain moves on); a later event past `max_event_bytes` is a `MidStreamFailure`. Nothing is
      read or buffered past either bound.
    - **Timeouts** (`config.timeouts`): `connect` bounds setting up the connection, `first_byte` the wait
      for a stream's first event, `idle` every gap between a stream's later events (`MidStreamFailure`
      `idle_timeout`), `total` the whole exchange. Before the first event each is an `UpstreamFailure`.
    - **One failure taxonomy.** Every upstream failure before the first event is an `UpstreamFailure`
      (classified by `classify_status` and the helpers here); after it `events()` raises
      `MidStreamFailure` — the proxy then ends the stream with one error event in the protocol's shape and
      no end marker — and never yields an error event or an end marker of its own for an incomplete answer.
    - **Keys redacted.** Whatever the upstream says goes through the `redactor` before it is relayed or
      logged — error bodies, response headers, the message of an error event — so no provider key reaches
      a client, a log line or a metric, even when the upstream echoes one.
    - **Connections released.** `StreamReply.close(reuse=False)` tears the upstream exchange down at once (a
      client that left stops the generation it was paying for); `reuse=True`, after a clean end, may pool it.
    - **`aclose()`** releases what the kind holds of its own — sessions, SDK clients, background tasks — and
      may be called more than once. It never closes the application's `session`, which the providers of the
      next runtime share. The runtime calls it once every request that started on the provider's runtime has
      ended (after a reload, `Gateway.apply`) and at shutdown. A probe or a model listing may still hold the
      provider for its own timeout: a call after `aclose` answers or fails as an `UpstreamFailure`.
    """

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

    async def aclose(self) -> None:
        """Release what the kind holds of its own (never the application's session); idempotent."""
        ...
