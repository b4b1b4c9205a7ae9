"""The request path: read and parse once, resolve, walk the chain, commit, relay.

The commit point is the first byte sent to the client. Before it, any chain entry may fail and the
next is tried. After it the answer belongs to one provider: an upstream failure ends the stream with an
error event and no `[DONE]`, so a truncated answer never looks complete; the proxy never switches
provider mid-answer. A client that goes away gets its upstream connection closed at once (the server
runs with `handler_cancellation`, so the handler is cancelled even while it waits on the upstream).

Providers answer with client-ready bytes (`providers.base`): this module never parses an answer. Per
request it parses the body once (`body.py`) and resolves the chain; per chunk it only writes what the
provider hands it and times the waits — no logging, no metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, aclosing
from dataclasses import dataclass
from time import perf_counter
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from . import logfmt
from .auth import Identity, identity_of
from .body import BodyBudget, parse, read_body
from .cache import Lookup, Tee
from .clients import model_allowed
from .config import ALIAS_PREFIX, ClientSpec, Hedge, Member, Step, Target
from .drain import Guard, shutting_down
from .errors import JSON_CONTENT_TYPE, ProxyError, error_body
from .failures import (
    HEDGED_LOST,
    SATURATED,
    SHUTTING_DOWN,
    UPSTREAM_ERROR,
    WON,
    MidStreamFailure,
    UpstreamFailure,
)
from .gateway import GATEWAY, Gateway, Runtime
from .health import Slot
from .health.latency import HedgeBudget
from .kinds import request_kind
from .limits import VERDICT
from .paths import addresses_stored_object, upstream_path
from .plan import Plan, hedge_in
from .protocols import StreamProtocol, for_path
from .providers.base import Call, Reply, StreamReply
from .record import CLIENT_DISCONNECTED, COMPLETED, HEDGE_WON, PRIMARY_WON, Attempt, RequestRecord
from .requestid import REQUEST_ID
from .routing import BARE_MODEL_PROVIDER, resolve

logger = logging.getLogger("manaproxy.proxy")  # pinned: deploy/README.md documents it

RESOLVED_HEADER = "X-Mana-LLM-Resolved"
# Printable ASCII but `%`: what a resolved name keeps as it is (percent-encoding the rest, as UTF-8).
_RESOLVED_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


def resolved_value(target: Target) -> str:
    """`X-Mana-LLM-Resolved`'s value: `provider/model`, percent-encoded (UTF-8) where it is not printable ASCII,
    so a model named `modèle` goes out as `mod%C3%A8le` rather than as raw bytes in a header."""
    name = str(target)
    if name.isascii() and name.isprintable() and "%" not in name:
        return name
    return quote(name, safe=_RESOLVED_SAFE)


_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


async def forward(request: web.Request) -> web.StreamResponse:
    """Handler for every forwarded `POST /v1/...` endpoint."""
    gateway = request.app[GATEWAY]
    # One config per request: a reload swaps `gateway.runtime`; this request keeps the one it started with.
    runtime = gateway.runtime
    record = RequestRecord(
        request_id=request[REQUEST_ID],
        endpoint=request.match_info.route.resource.canonical if request.match_info.route.resource else request.path,
        started=perf_counter(),
    )
    # Who asks: the client it was let in as (its name), or without auth `anonymous` and its address.
    identity = identity_of(request)
    record.client = identity.name
    drain = gateway.drain
    guard = drain.guard()
    try:
        if drain.stopping:
            raise shutting_down()
        # The body's share of the in-flight budget is held until the commit (see `_commit`) at most.
        async with guard:
            server = runtime.config.server
            with gateway.body_budget.reserve(identity.share, server.max_inflight_body_bytes_per_client) as claim:
                return await _Forwarder(request, gateway, runtime, record, guard, identity).run(claim)
    except ProxyError as err:
        return _refused(request, record, err)
    except TimeoutError:
        if not guard.cut:
            record.status = 500
            record.error_type = "internal_error"
            raise
        return _refused(request, record, shutting_down())  # the drain ended it before an answer began
    except Exception:
        record.status = 500
        record.error_type = "internal_error"
        raise
    except asyncio.CancelledError:
        # The client went away (handler cancellation); nothing more can be sent.
        # Not an error of ours nor of the provider's: no error_type, status 499 as nginx logs it.
        if record.outcome is None and record.streaming and record.first_byte is not None:
            record.outcome = CLIENT_DISCONNECTED
        if record.first_byte is None:
            record.status = 499
        raise
    finally:
        record.duration = perf_counter() - record.started
        client = identity.client
        if client is not None and record.prompt_tokens is not None:
            gateway.limiter.spend(client, record.prompt_tokens + (record.completion_tokens or 0))
        gateway.observe(record)


async def other_method(request: web.Request) -> web.Response:
    """Any method but POST under `/v1/` (bar the read-only views): nothing manaproxy can route."""
    raise ProxyError(
        405,
        f"{request.method} {request.path[:100]}: manaproxy forwards POST requests routed by their 'model'; "
        "objects stored at one provider (files, batches, responses) are read and deleted there",
        code="method_not_allowed",
        headers={"Allow": "POST"},
    )


ATTEMPTS_HEADER = "X-Mana-LLM-Attempts"
RETRY_AFTER_MS = "retry-after-ms"
RETRY_MARGIN = 0.2  # seconds added to a precise wait (`retry-after-ms`): a probe due then has answered by then
_RNG = random.Random()  # pool choices: ties broken at random in proportion to weight


@dataclass(slots=True)
class _Racer:
    """One attempt of a hedged race: its target, its claim on health (held until it ends) and when it began."""

    target: Target
    call: Call
    slot: Slot
    stack: ExitStack
    started: float
    hedge: bool  # started beside a late attempt rather than first or after a failure
    skips: int  # the plan's held skips when it started: passed over on its way, written if it wins


_Result = Reply | StreamReply | web.Response | None  # what one attempt's `_Forwarder._send` comes back with


class _Race:
    """One request's hedged walk down its chain: the attempts in flight, and whether more may start.

    Which target comes next is the plan's (`Plan.next`), and when it starts beside those in flight too
    (`plan.hedge_in`); this starts the attempts, waits for them and sorts out what each came back with.
    """

    __slots__ = ("_budget", "_call_to", "_forwarder", "_hedge", "_plan", "_primary", "hedged", "hedging", "racers")

    def __init__(
        self, forwarder: _Forwarder, plan: Plan, hedge: Hedge, call_to: Callable[[Target], Call], budget: HedgeBudget
    ) -> None:
        self._forwarder = forwarder
        self._plan = plan
        self._hedge = hedge
        self._call_to = call_to
        self._budget = budget
        self._primary: Target | None = None  # the first target started: `hedge_after: auto` goes by its latency
        self.racers: dict[asyncio.Task[_Result], _Racer] = {}
        self.hedged = False  # a hedge was started
        self.hedging = True  # more hedges may start: the plan and the budget have not run out

    def __repr__(self) -> str:
        return f"<_Race {[str(racer.target) for racer in self.racers.values()]} hedged={self.hedged}>"

    def start_next(self, *, hedge: bool = False) -> bool:
        """Start the plan's next target (`hedge`: beside late attempts); False when the plan has run out.
        The plan's last resort (an entry kept out by a rate limit or by news) only once nothing else is in
        flight: never as a hedge, nor to replace a failed attempt beside one still running."""
        plan = self._plan
        target = plan.next(beside=hedge or bool(self.racers))
        if target is None:
            self.hedging = False
            return False
        if self._primary is None:
            self._primary = target
        forwarder = self._forwarder
        forwarder.record.calls.append(target)
        call = self._call_to(target)
        stack = ExitStack()
        slot = stack.enter_context(forwarder._claim(target, call.stream))
        task = asyncio.get_running_loop().create_task(forwarder._send(target, call, slot))
        self.racers[task] = _Racer(target, call, slot, stack, perf_counter(), hedge=hedge, skips=plan.skipped_beside)
        return True

    async def step(self) -> tuple[_Racer, Reply | StreamReply] | web.StreamResponse | None:
        """Wait for the attempts in flight until one comes back or a hedge is due: the winner and its reply,
        the caller's own error (the answer), or None to step again. A failed attempt is replaced by the next
        target; one that answered in the same moment as the winner is a loser all the same."""
        racers = self.racers
        if not racers:
            return None
        wait = hedge_in(
            racing=len(racers),
            max_extra=self._hedge.max_extra,
            hedging=self.hedging,
            delay=self._delay(),
            youngest=max(racer.started for racer in racers.values()),
            now=perf_counter(),
        )
        done, _ = await asyncio.wait(racers, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            self._start_hedge()
            return None
        winner: tuple[_Racer, Reply | StreamReply] | None = None
        for task in done:
            racer = racers.pop(task)
            result = task.result()
            if isinstance(result, web.StreamResponse):  # the caller's own error: the answer
                racer.stack.close()
                return result
            if result is None:  # failed (recorded): fall back, beside any survivor
                racer.stack.close()
                if len(racers) <= self._hedge.max_extra:
                    self.start_next()
            elif winner is None:
                winner = (racer, result)
            else:
                if not isinstance(result, Reply):
                    result.close(reuse=False)
                racer.stack.close()
                self._forwarder.record.attempts.append(Attempt(racer.target, HEDGED_LOST))
        return winner

    def _start_hedge(self) -> None:
        """The attempts in flight are late: start the next target beside them, if the budget pays for it."""
        if not self._budget.spend():
            self.hedging = False
        elif self.start_next(hedge=True):
            self.hedged = True
        else:
            self._budget.refund()

    def _delay(self) -> float | None:
        """Seconds before late attempts get company: `hedge_after`, or for `auto` what the first target's
        recent times to first byte say; None: no hedging (yet)."""
        hedge = self._hedge
        if not hedge.auto or self._primary is None:
            return hedge.delay(None)
        primary, streaming = self._primary, self._forwarder.record.streaming
        return hedge.delay(self._forwarder.gateway.health.ttfb_p95(primary.provider, primary.model, stream=streaming))

    async def cancel(self) -> None:
        """Cancel the attempts in flight (they lost, or the request ended): their upstream connections close
        at once, their claims on health are given back, and no outcome is recorded for them."""
        racers = self.racers
        tasks = list(racers)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                result = await task
                if result is not None and not isinstance(result, Reply | web.StreamResponse):
                    result.close(reuse=False)  # it answered just as it was cancelled
        for racer in racers.values():
            racer.stack.close()
        racers.clear()


def exhausted(attempts: list[Attempt], max_retry_after: float = 5.0) -> ProxyError:
    """The answer when every chain entry failed or was skipped, keeping what the providers meant.

    - one entry was tried and answered an HTTP status, and no other is only waiting → that status and the
      provider's own error object (`type`, `code`, `param` as it sent them; the message prefixed with the
      entry) with its headers (`Retry-After`, `retry-after-ms`, `x-ratelimit-*` ...): what the client would
      have had from that provider. But a 401/403 about our provider key, or a redirect we do not follow, is
      a 502: the client's own key is fine;
    - every entry tried answered 429 → 429, with the smallest wait among the entries;
    - a lone entry, not tried because its breaker keeps it out, whose last failure was an HTTP error → that
      error as above (status, error object, headers), plus our `Retry-After`: an SDK's retry that meets the
      open breaker ends with the provider's status and message, as its direct call would;
    - otherwise 503, with `Retry-After` when an entry is only kept out for a while (breaker, rate limit).
    Every `Retry-After` written here is the seconds until the first such entry will really be tried again
    (its next recovery probe or trial, or the end of its rate limit), rounded up, at least 1 and at most
    `max_retry_after` (`health.max_retry_after_seconds`); `retry-after-ms` beside it says the same wait to
    the millisecond, plus `RETRY_MARGIN` for a probe then due to have answered (the SDKs prefer it). (An
    entry that will be back in seconds makes "retry then" a truer answer than one entry's 404 or 500.)
    The list of entries and what each did is in the message and in `X-Mana-LLM-Attempts`.
    """
    summary = ", ".join(attempt.listed for attempt in attempts)
    headers = {ATTEMPTS_HEADER: quote(summary, safe=" /=,:._-@+%")}  # each item escaped: `Attempt.listed`
    tried = [attempt for attempt in attempts if attempt.tried]
    waiting = any(attempt.retry_after is not None for attempt in attempts if not attempt.tried)
    if len(tried) == 1 and (failure := tried[0].failure) is not None and failure.status is not None and not waiting:
        return _one_entrys_error(tried[0].target, failure, failure.status, headers)
    waits = [attempt.retry_after for attempt in attempts if attempt.retry_after is not None]
    if waits:
        wait = min(*waits, max_retry_after)
        headers["Retry-After"] = str(max(1, min(math.ceil(wait), math.floor(max_retry_after))))
        headers[RETRY_AFTER_MS] = str(round((wait + RETRY_MARGIN) * 1000))
    lone = attempts[0] if len(attempts) == 1 and not tried else None
    if lone is not None and (last := lone.last) is not None and last.status is not None:
        return _one_entrys_error(lone.target, last, last.status, headers)
    if tried and all(attempt.status == 429 for attempt in tried):
        return ProxyError(429, f"every chain entry is rate limited: {summary}", code="rate_limited", headers=headers)
    return ProxyError(503, f"no chain entry could answer: {summary}", code="all_targets_failed", headers=headers)


def _one_entrys_error(target: Target, failure: UpstreamFailure, status: int, headers: dict[str, str]) -> ProxyError:
    """The error of the one entry, as its provider answered it (see `exhausted`): `failure` is the attempt's,
    or, when the entry was kept out rather than tried, its last one."""
    ours = {name.lower() for name in headers}  # our retry headers replace the provider's, whatever their case
    own = {**{name: value for name, value in failure.headers if name.lower() not in ours}, **headers}
    error = failure.error or {}
    message = error.get("message")
    text = f"{target}: {message if isinstance(message, str) else failure.detail or f'HTTP {status}'}"
    if status in (401, 403) or status < 400:  # about our key, or a redirect: not the client's
        return ProxyError(502, text, code=failure.reason, headers=own)
    if failure.error is not None:
        return ProxyError(status, text, headers=own, relayed=failure.error)
    return ProxyError(status, text, code=failure.reason, headers=own)


def _stored_object(path: str) -> ProxyError:
    """The answer to a request for an object stored at one provider (a file, a stored response ...)."""
    return ProxyError(
        404,
        f"manaproxy routes requests by their 'model'; {path[:100]} addresses an object stored at one "
        "provider: call that provider directly",
        code="unsupported_endpoint",
    )


def _refused(request: web.Request, record: RequestRecord, err: ProxyError) -> web.Response:
    """Our own error as the request's answer."""
    record.status = err.status
    record.error_type = record.error_type or err.code or "error"
    response = err.response()
    if err.code == SHUTTING_DOWN or not request.content.at_eof():
        # Shutting down, or refused before its body was read (413, 408 ...): close rather than read on.
        response.force_close()
    return response


class _Forwarder:
    """One request's walk down its chain."""

    __slots__ = (
        "cached",
        "claim",
        "gateway",
        "guard",
        "identity",
        "kind",
        "lone",
        "raw",
        "record",
        "request",
        "runtime",
    )

    def __init__(
        self,
        request: web.Request,
        gateway: Gateway,
        runtime: Runtime,
        record: RequestRecord,
        guard: Guard,
        identity: Identity,
    ) -> None:
        self.request = request
        self.gateway = gateway
        self.runtime = runtime
        self.record = record
        self.guard = guard
        self.identity = identity
        self.raw = bytearray()
        self.kind = ""  # the request's kind, for health (`kinds.py`)
        self.lone = False  # the request's chain is one target (`Route.lone`)
        self.cached: Lookup | None = None  # the request's route caches (`cache.py`)

    async def run(self, claim: BodyBudget.Claim) -> web.StreamResponse:
        self.claim = claim
        config = self.runtime.config
        server = config.server
        record = self.record
        # Checked before anything else: the provider's key goes wherever this path points.
        url = self.request.rel_url
        path = upstream_path(url.raw_path, url.raw_query_string)
        started = perf_counter()
        # A small body usually arrives with the headers: then there is nothing to wait for, nor to time.
        arrived = self.request.content.is_eof()
        try:
            async with contextlib.nullcontext() if arrived else asyncio.timeout(server.body_timeout_seconds):
                raw = self.raw = await read_body(
                    self.request, server.max_body_bytes, claim, server.max_inflight_body_bytes
                )
        except TimeoutError:
            raise ProxyError(
                408, f"request body did not arrive within {server.body_timeout_seconds:g}s", code="body_timeout"
            ) from None
        record.client_wait += perf_counter() - started
        if not raw.strip() and addresses_stored_object(path):  # `responses.cancel` sends no body at all
            raise _stored_object(url.path)
        body = await parse(raw, self.request.headers.get("Content-Type", ""), server)  # large: in a thread
        if body.model is None and addresses_stored_object(path):
            raise _stored_object(url.path)
        record.streaming = body.stream
        record.requested = body.model or ""
        client = self.identity.client
        if client is not None:
            await self._admit(client, body.model or config.default or "")
        route = resolve(body.model, config)
        record.alias = route.alias
        if route.alias is None:
            record.requested_provider = route.chain[0].provider
        accept = self.request.headers.get("Accept")
        protocol = for_path(path)
        headers = self.request.headers
        # The cache: looked up before any chain entry is tried; a miss is stored once it has been sent.
        cached = self.cached = await self.gateway.cache.lookup(self.request, config, route, path, body, record)
        if cached is not None and cached.hit is not None:
            return self.gateway.cache.replay(cached, record)
        self.kind = request_kind(path, raw)
        self.lone = route.lone
        health = self.gateway.health

        def call_to(target: Target) -> Call:
            return Call(path, body, target, record.request_id, accept, protocol, headers)

        steps = route.steps
        deadline: float | None = None
        plans: list[Plan] = []
        while True:
            plan = Plan(steps, config, health, record, _RNG, self.kind, lone=self.lone)
            plans.append(plan)
            if route.hedge is None:
                while (target := plan.next()) is not None:
                    answer = await self._try(target, call_to(target))
                    if answer is not None:
                        return answer
            else:
                answer = await self._race(plan, route.hedge, call_to, first=deadline is None)
                if answer is not None:
                    return answer
            # Entries skipped only for being at their limit: wait for the first place any of them frees (a
            # request to a busy GPU is better late than refused), at most the first entry's first-byte timeout.
            saturated = list(dict.fromkeys(a.target for a in record.attempts if a.reason == SATURATED))
            if not saturated:
                break
            now = perf_counter()
            if deadline is None:
                deadline = now + config.providers[route.chain[0].provider].timeouts.first_byte
            if now >= deadline or not await health.slot_freed(saturated, deadline - now):
                break
            record.attempts[:] = [attempt for attempt in record.attempts if attempt.reason != SATURATED]
            members = {member.target: member for step in route.steps for member in step.members}
            steps = tuple(Step((members.get(target) or Member(target),)) for target in saturated)
        # A rate-limited entry held back while a saturated one was waited for: its turn, once the wait is over.
        for plan in plans:
            if (target := plan.held()) is not None:
                answer = await self._try(target, call_to(target))
                if answer is not None:
                    return answer
        record.error_type = "all_failed"
        raise exhausted(record.attempts, config.health.max_retry_after_seconds)

    async def _admit(self, client: ClientSpec, model: str) -> None:
        """The client's allow-list (403) and limits (429), before routing and before any upstream call. The
        allow-list sees the name the request gave, and `ollama/<name>` for a bare model name."""
        names = [model]
        if "/" not in model and not model.startswith(ALIAS_PREFIX):
            names.append(f"{BARE_MODEL_PROVIDER}/{model}")
        if not model_allowed(client, names):
            shown = model if len(model) <= 150 else model[:150] + "..."
            raise ProxyError(
                403,
                f"client {client.name!r} may not use the model '{shown}'",
                code="model_not_allowed",
                param="model",
            )
        verdict = await self.gateway.limiter.admit(client)  # raises the 429 (error_type: its code)
        if verdict is not None:
            self.request[VERDICT] = verdict

    def _claim(self, target: Target, stream: bool) -> AbstractContextManager[Slot]:
        provider = self.runtime.config.providers[target.provider]
        return self.gateway.health.attempt(
            provider, target.model, stream=stream, client=self.identity.sample_key, kind=self.kind, lone=self.lone
        )

    async def _try(self, target: Target, call: Call) -> web.StreamResponse | None:
        """Try one target. A response means the request is answered; None means fall back."""
        self.record.calls.append(target)
        with self._claim(target, call.stream) as slot:
            started = perf_counter()
            try:
                reply = await self._send(target, call, slot)
            finally:
                self.record.upstream_wait += perf_counter() - started
            if reply is None or isinstance(reply, web.StreamResponse):
                return reply
            return await self._commit(target, reply, slot, call.protocol)

    async def _send(self, target: Target, call: Call, slot: Slot) -> Reply | StreamReply | web.Response | None:
        """Send `call` to `target`: its reply, None to fall back (the failure recorded), or the caller's own
        error (a 400 ...) to answer with."""
        record = self.record
        started = perf_counter()
        try:
            reply = await self.runtime.providers[target.provider].send(call)
        except UpstreamFailure as failure:
            slot.failed(failure)
            return self._failed(target, failure)
        except ProxyError:
            raise  # the provider found the request itself wrong (e.g. a body only a full decode rejects)
        except Exception as exc:
            # A bug in a provider module must not cost the client its answer: log it, try the next entry.
            logger.exception("request %s: provider %s raised", record.request_id, target.provider)
            internal = UpstreamFailure.internal(f"provider error: {type(exc).__name__}")
            slot.failed(internal)
            return self._failed(target, internal)
        # Unstreamed, the answer's time per output token (when its usage says) is what a learned limit reads.
        tokens = reply.usage[1] if isinstance(reply, Reply) and reply.usage is not None else None
        slot.succeeded(perf_counter() - started, tokens)
        return reply

    async def _race(
        self, plan: Plan, hedge: Hedge, call_to: Callable[[Target], Call], *, first: bool = True
    ) -> web.StreamResponse | None:
        """Walk the chain with hedging: once the attempt in flight has no first event (or, unstreamed, no
        answer) `hedge` seconds after it started, the next target starts beside it, at most `max_extra` at
        once. The first to answer is committed and every other cancelled at once (its upstream connection
        closed); a cancelled loser is neither a failure nor a fallback. A failure is followed by the next
        target, as without hedging. Nothing is raced after the commit point. A request earns its share of the
        hedge budget once (`first`), however often it walks the chain again after waiting for a free place."""
        record = self.record
        budget = self.gateway.health.hedge_budget(record.alias or "", hedge.budget_percent)
        if first:
            budget.earn()
        race = _Race(self, plan, hedge, call_to, budget)
        started = perf_counter()
        try:
            if not race.start_next():
                return None
            while race.racers:
                outcome = await race.step()
                if outcome is None:
                    continue
                if isinstance(outcome, web.StreamResponse):
                    return outcome
                racer, reply = outcome
                losers = [other.target for other in race.racers.values()]
                await race.cancel()
                record.upstream_wait += perf_counter() - started
                started = 0.0  # counted
                plan.settle(racer.skips)  # an entry skipped after the winner started was not fallen back past
                if race.hedged:  # the request log shows the race: `attempts=gpu1/m:hedged_lost,gpu2/m:won`
                    record.hedge = HEDGE_WON if racer.hedge else PRIMARY_WON
                    record.attempts.extend(Attempt(target, HEDGED_LOST) for target in losers)
                    record.attempts.append(Attempt(racer.target, WON))
                with racer.stack:
                    return await self._commit(racer.target, reply, racer.slot, racer.call.protocol)
            return None
        finally:
            await race.cancel()  # the client left, or the drain cut the request, mid-race
            plan.settle()  # no answer: every entry skipped was passed over
            if started:
                record.upstream_wait += perf_counter() - started

    async def _commit(
        self, target: Target, reply: Reply | StreamReply, slot: Slot, protocol: StreamProtocol
    ) -> web.StreamResponse:
        """COMMIT to `target`: its answer goes to the client, whole or streamed."""
        self._let_go_of_body()
        record = self.record
        record.target = target
        record.status = reply.status
        if isinstance(reply, Reply):
            if reply.usage is not None:
                record.prompt_tokens, record.completion_tokens = reply.usage
            headers = _answer_headers(
                reply.headers, {"Content-Type": reply.content_type, RESOLVED_HEADER: resolved_value(target)}
            )
            record.first_byte = perf_counter() - record.started
            if self.cached is not None:
                self.gateway.cache.store_reply(self.cached, reply, headers[RESOLVED_HEADER])
            return web.Response(status=reply.status, body=reply.body, content_type=None, headers=headers)
        return await self._relay(target, reply, slot, protocol)

    def _let_go_of_body(self) -> None:
        """At the commit no chain entry will be sent the body again: free its bytes and give its share of
        the body budget back, so that a long answer does not hold it. Kept (to the request's end) only
        while the upstream is still being sent it (a view of it is exported: an upstream answering early)."""
        with contextlib.suppress(BufferError):
            self.raw.clear()
            self.claim.release()

    def _failed(self, target: Target, failure: UpstreamFailure) -> web.Response | None:
        """Note a failed attempt; None to fall back, or the caller's error relayed as the answer."""
        record = self.record
        if failure.fallback:
            record.attempts.append(Attempt.failed(target, failure))
            return None
        # The caller's request is wrong (400, 413, 422 ...): its error goes back as the upstream sent it.
        record.status = failure.status or 502
        record.error_type = failure.reason
        record.target = target
        return _caller_error(failure, target)

    async def _relay(
        self, target: Target, reply: StreamReply, slot: Slot, protocol: StreamProtocol
    ) -> web.StreamResponse:
        """Commit to `target` and relay its stream; a failure from here on ends it with an error event."""
        record = self.record
        tee: Tee | None = None
        if self.cached is not None:
            reply = tee = self.gateway.cache.tee(self.cached, reply)
        ours = {**_STREAM_HEADERS, RESOLVED_HEADER: resolved_value(target)}
        if any(name.lower() == "content-type" for name, _ in reply.headers):
            del ours["Content-Type"]  # the upstream's, `; charset=utf-8` and all (`headers.to_client`)
        response = web.StreamResponse(status=reply.status, headers=_answer_headers(reply.headers, ours))
        clean_end = False
        try:
            # COMMIT: from here on this answer belongs to `target`.
            await response.prepare(self.request)
            failure: MidStreamFailure | None = None
            try:
                await self._pump(reply, response)
                clean_end = True
            except MidStreamFailure as exc:
                failure = exc
            except asyncio.CancelledError:
                if not self.guard.cut:
                    raise  # the client went away
                # The shutdown drain ran out of time: end the stream cleanly rather than cut the body.
                failure = MidStreamFailure.shutting_down()
            except ConnectionError:
                raise
            except Exception:
                logger.exception("request %s: relaying %s failed", record.request_id, logfmt.value(target))
                failure = MidStreamFailure.relay_error()
            if reply.complete:  # a cut after the protocol's end loses nothing
                record.outcome = COMPLETED
            else:
                failure = failure or MidStreamFailure(
                    UPSTREAM_ERROR, f"upstream ended the stream without {protocol.end}"
                )
                self._end_with_error(target, failure)
                if failure.provider_fault:
                    slot.failed_after_commit(failure.detail)
                if failure.reason == SHUTTING_DOWN:
                    message = f"manaproxy is shutting down: the answer from {target} was cut short"
                else:
                    message = f"upstream {target} failed mid-stream: {failure.detail}"
                await response.write(protocol.error_event(message, code=failure.reason))
            await response.write_eof()
            if tee is not None and clean_end and self.cached is not None:
                self.gateway.cache.store_stream(self.cached, tee, response.headers[RESOLVED_HEADER], protocol)
        except ConnectionError:
            record.outcome = record.outcome or CLIENT_DISCONNECTED
        finally:
            # Tokens the usage event reported count however the stream ended (a client that left after it too).
            if reply.usage is not None:
                record.prompt_tokens, record.completion_tokens = reply.usage
            # Back to the pool only after a clean end; otherwise torn down so the provider stops generating.
            reply.close(reuse=clean_end)
        return response

    async def _pump(self, reply: StreamReply, response: web.StreamResponse) -> None:
        """Relay the provider's client-ready events as they arrive, timing who the relay waits on."""
        record = self.record
        await response.write(reply.first)
        record.first_byte = perf_counter() - record.started
        upstream_wait = client_wait = 0.0
        waiting_since: float | None = perf_counter()  # set while waiting on the upstream
        try:
            async with aclosing(reply.events()) as events:
                async for chunk in events:
                    writing = perf_counter()
                    upstream_wait += writing - waiting_since  # type: ignore[operator]
                    waiting_since = None
                    await response.write(chunk)
                    waiting_since = perf_counter()
                    client_wait += waiting_since - writing
        finally:
            # The last wait (for the end of the body, or one that failed) is the upstream's too.
            if waiting_since is not None:
                upstream_wait += perf_counter() - waiting_since
            record.upstream_wait += upstream_wait
            record.client_wait += client_wait

    def _end_with_error(self, target: Target, failure: MidStreamFailure) -> None:
        self.record.outcome = failure.reason
        self.record.error_type = failure.reason
        logger.warning(
            "request %s: %s failed after commit: %s",
            self.record.request_id,
            logfmt.value(target),
            logfmt.value(failure.detail),
        )


def _caller_error(failure: UpstreamFailure, target: Target) -> web.Response:
    """The upstream's own 4xx, relayed; wrapped in the OpenAI shape if it is not already in it."""
    status = failure.status or 502
    body = failure.body or b""
    if not failure.shaped:
        body = error_body(
            f"upstream {target} rejected the request: {failure.detail}", status=status, code=failure.reason
        )
    headers = _answer_headers(
        failure.headers, {"Content-Type": JSON_CONTENT_TYPE, RESOLVED_HEADER: resolved_value(target)}
    )
    return web.Response(status=status, body=body, content_type=None, headers=headers)


def _answer_headers(upstream: list[tuple[str, str]], ours: dict[str, str]) -> CIMultiDict[str]:
    """The upstream's headers meant for the client (`headers.to_client`), with ours winning on conflict."""
    headers: CIMultiDict[str] = CIMultiDict(upstream)
    for name, value in ours.items():
        headers[name] = value
    return headers
