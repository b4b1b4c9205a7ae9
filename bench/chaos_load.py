"""The client side of `make chaos`: a bounded request plan, the load loop, and the outcome of each answer.

Rule of this module: every answer manaproxy gives falls in exactly one category (`classify`, pure):
- `complete`: 200 and, streamed, the last SSE event is `data: [DONE]`; unstreamed, a JSON chat.completion;
- `visible_mid_stream_error`: a 200 stream whose last event is `data: {"error": ...}`, with no `[DONE]`;
- `silent_truncation`: any other 200 (a stream with neither, a body that is no chat.completion);
- `proxy_500`: HTTP 500; `refused`: any other status >= 400 (counted by status);
- `unexpected_status`: 1xx-3xx other than 200; `transport_error`: the connection to manaproxy failed.
`rescued` (a part of `complete`) and the other cross-checks are counted by the driver, bench/chaos.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp
import orjson

COMPLETE = "complete"
VISIBLE_ERROR = "visible_mid_stream_error"
SILENT_TRUNCATION = "silent_truncation"
REFUSED = "refused"
PROXY_500 = "proxy_500"
UNEXPECTED_STATUS = "unexpected_status"
TRANSPORT_ERROR = "transport_error"
CATEGORIES = (COMPLETE, VISIBLE_ERROR, SILENT_TRUNCATION, REFUSED, PROXY_500, UNEXPECTED_STATUS, TRANSPORT_ERROR)

PROMPT = [{"role": "user", "content": "Tell me something, unless your provider fails."}]


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of the plan."""

    index: int
    alias: str
    stream: bool


@dataclass(slots=True)
class Outcome:
    """What the client saw of one request."""

    index: int
    alias: str
    stream: bool
    category: str = TRANSPORT_ERROR
    status: int | None = None
    resolved: str | None = None  # X-Mana-LLM-Resolved
    retry_after: str | None = None  # Retry-After, on a refusal
    ran_out: bool = False  # the chain ran out: an error answer with X-Mana-LLM-Attempts (503, or a lone 4xx/429)
    detail: str = ""  # short: why a non-complete answer is what it is
    openai_shaped: bool = True  # for status >= 400: the body is {"error": {"message": str, "type": str ...}}
    error_code: str | None = None  # the `code` of an error body
    model_mismatch: bool = False  # a 200 answer whose `model` is not the resolved target
    seconds: float = 0.0


@dataclass(slots=True)
class Verdict:
    category: str
    detail: str = ""
    openai_shaped: bool = True
    error_code: str | None = None
    models: set[str] = field(default_factory=set)  # the `model` values seen in a 200 answer


def plan(count: int, aliases: Sequence[tuple[str, float]], stream_share: float, seed: int) -> list[Planned]:
    """`count` requests: alias drawn by weight, streamed with probability `stream_share`; fixed by `seed`."""
    rng = random.Random(f"plan:{seed}")
    names = [name for name, _ in aliases]
    weights = [weight for _, weight in aliases]
    return [Planned(i, rng.choices(names, weights)[0], rng.random() < stream_share) for i in range(count)]


def sse_data(body: bytes) -> list[bytes]:
    """The `data` of each SSE event in `body`, in order (multi-line data joined with a newline)."""
    events = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if lines:
            events.append(b"\n".join(lines))
    return events


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _error_shape(body: bytes) -> tuple[bool, str | None, str]:
    """(OpenAI-shaped error?, its code, the start of its message)."""
    data = _json(body)
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return False, None, body[:120].decode(errors="replace")
    message, code = error.get("message"), error.get("code")
    shaped = isinstance(message, str) and isinstance(error.get("type"), str)
    return shaped, code if isinstance(code, str) else None, str(message)[:200]


def _is_completion(data: Any) -> bool:
    return isinstance(data, dict) and data.get("object") == "chat.completion" and isinstance(data.get("choices"), list)


def classify(stream: bool, status: int, content_type: str, body: bytes) -> Verdict:
    """The category of one whole answer (see the module docstring)."""
    if status >= 400:
        shaped, code, message = _error_shape(body)
        category = PROXY_500 if status == 500 else REFUSED
        return Verdict(category, f"HTTP {status}: {message}", openai_shaped=shaped, error_code=code)
    if status != 200:
        return Verdict(UNEXPECTED_STATUS, f"HTTP {status}")
    if not stream or not content_type.startswith("text/event-stream"):
        data = _json(body)
        if _is_completion(data):
            return Verdict(COMPLETE, models={str(data.get("model"))})
        what = "not JSON" if data is None else "JSON but no chat.completion"
        return Verdict(SILENT_TRUNCATION, f"200 {content_type or 'no content type'}: {what} ({len(body)} bytes)")
    events = sse_data(body)
    if not events:
        return Verdict(SILENT_TRUNCATION, "200 stream without a single event")
    chunks = [_json(data) for data in events if data != b"[DONE]"]
    models = {str(c.get("model")) for c in chunks if isinstance(c, dict) and "model" in c}
    if events[-1] == b"[DONE]":
        errors = sum(1 for c in chunks if isinstance(c, dict) and "error" in c)
        return Verdict(COMPLETE, "an error event before [DONE]" if errors else "", models=models)
    last = chunks[-1] if chunks else None
    if isinstance(last, dict) and isinstance(last.get("error"), dict) and b"[DONE]" not in events:
        shaped, code, message = _error_shape(events[-1])
        return Verdict(VISIBLE_ERROR, message, shaped, code, models=models)
    tail = events[-1][:80].decode(errors="replace")
    return Verdict(SILENT_TRUNCATION, f"200 stream of {len(events)} events ending with: {tail}", models=models)


async def one_request(session: aiohttp.ClientSession, url: str, planned: Planned) -> Outcome:
    """Send one planned request, read the whole answer, classify it."""
    outcome = Outcome(planned.index, planned.alias, planned.stream)
    body = orjson.dumps({"model": planned.alias, "messages": PROMPT, "stream": planned.stream})
    started = perf_counter()
    headers_seen = False
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            headers_seen = True
            outcome.status = resp.status
            outcome.resolved = resp.headers.get("X-Mana-LLM-Resolved")
            outcome.retry_after = resp.headers.get("Retry-After")
            outcome.ran_out = resp.status >= 400 and "X-Mana-LLM-Attempts" in resp.headers
            content = await resp.read()
            content_type = resp.headers.get("Content-Type", "")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        outcome.category = TRANSPORT_ERROR
        phase = "reading the body" if headers_seen else "before the headers"
        outcome.detail = f"{type(exc).__name__} {phase}: {str(exc)[:120]}"
        outcome.seconds = perf_counter() - started
        return outcome
    outcome.seconds = perf_counter() - started
    verdict = classify(planned.stream, resp.status, content_type, content)
    outcome.category = verdict.category
    outcome.detail = verdict.detail
    outcome.openai_shaped = verdict.openai_shaped
    outcome.error_code = verdict.error_code
    if outcome.status == 200 and verdict.models and verdict.models != {outcome.resolved}:
        outcome.model_mismatch = True
    return outcome


async def run_load(
    url: str,
    requests: Sequence[Planned],
    *,
    concurrency: int,
    rate: float,
    max_seconds: float,
    client_timeout: float,
) -> tuple[list[Outcome], int, float]:
    """Send `requests` with `concurrency` clients, request i not before i / `rate` seconds (`rate` 0: no
    pacing); none is started after `max_seconds`.

    Returns the outcomes, how many planned requests were never sent, and the wall time. A request still
    running `client_timeout` seconds after it started counts as a transport error (a stuck request).
    """
    pending = iter(requests)
    outcomes: list[Outcome] = []
    started = perf_counter()
    deadline = started + max_seconds
    timeout = aiohttp.ClientTimeout(total=client_timeout)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)

    async def client(session: aiohttp.ClientSession) -> None:
        for planned in pending:
            if rate:
                await asyncio.sleep(started + planned.index / rate - perf_counter())
            if perf_counter() >= deadline:
                return
            outcomes.append(await one_request(session, url, planned))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    unsent = len(requests) - len(outcomes)
    return outcomes, unsent, perf_counter() - started
