"""Through the SDK's own retries, manaproxy is indistinguishable from a direct call (issue 16).

Each case scripts the same upstream twice — once called directly, once through manaproxy (a one-entry alias,
`failure_threshold: 2`, probes on) — and runs the same app calls with the real `openai` SDK and its DEFAULT
retries (`max_retries=2`, honouring `Retry-After`/`retry-after-ms`). Per call, the table compares the outcome,
the exception class, the status, the provider's message and the elapsed time (within a second of direct).
Run with `-s` to see the table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import openai
import pytest
from aiohttp import web

from .fakes import FakeUpstream, Recorded, chat_completion, json_reply, status_reply
from .helpers import build_config
from .processes import free_port

HEALTH = {"failure_threshold": 2, "backoff_seconds": 60}
# llama.cpp's answer to an image sent to a text-only model.
NO_IMAGES = "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
ELAPSED_SLACK = 1.0  # seconds: through manaproxy within this of direct
# The one difference no gateway can remove: without an HTTP answer the SDK raises APIConnectionError; a
# gateway answers with one (503, listing the entry and why).
INHERENT = {("APIConnectionError", "InternalServerError")}


# -- the app's calls -----------------------------------------------------------------------------------


async def _chat(client: openai.AsyncOpenAI, model: str) -> None:
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


async def _image(client: openai.AsyncOpenAI, model: str) -> None:
    content: Any = [{"type": "text", "text": "what is this?"}, IMAGE]
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}])


async def _embeddings(client: openai.AsyncOpenAI, model: str) -> None:
    await client.embeddings.create(model=model, input="hi")


CALLS: dict[str, Callable[[openai.AsyncOpenAI, str], Awaitable[None]]] = {
    "chat": _chat,
    "image": _image,
    "embeddings": _embeddings,
}


# -- the table -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one app call ended in."""

    error: str  # the exception class, or "-" when it succeeded
    status: int | None
    message: str  # the error's message as the app reads it (`exc.body["message"]`)
    elapsed: float

    def cell(self) -> str:
        what = "ok" if self.error == "-" else f"{self.error} {self.status or ''}".strip()
        return f"{what} {self.elapsed:.2f}s"


@dataclass
class Row:
    case: str
    call: str
    direct: Outcome
    through: Outcome

    @property
    def differences(self) -> list[str]:
        """How the call through manaproxy differs from direct (empty: indistinguishable)."""
        direct, through = self.direct, self.through
        found = []
        if direct.error != through.error and (direct.error, through.error) not in INHERENT:
            found.append(f"class {direct.error} != {through.error}")
        if direct.error == through.error and direct.status != through.status:
            found.append(f"status {direct.status} != {through.status}")
        # Ours prefixes the entry: `a/m: <the provider's message>`. (No HTTP answer direct: no message to keep.)
        if direct.error == through.error and direct.message not in through.message:
            found.append(f"message {direct.message!r} not in {through.message!r}")
        if abs(through.elapsed - direct.elapsed) > ELAPSED_SLACK:
            found.append(f"elapsed {direct.elapsed:.2f}s vs {through.elapsed:.2f}s")
        return found

    def line(self) -> str:
        same = "same" if not self.differences else "; ".join(self.differences)
        if not self.differences and self.direct.error != self.through.error:
            same = "inherent (no HTTP answer direct)"
        return f"| {self.case} | {self.call} | {self.direct.cell()} | {self.through.cell()} | {same} |"


TABLE: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[list[Row]]:
    """Print the whole "direct vs through manaproxy" table once the module's cases have run."""
    yield TABLE
    if TABLE:
        print("\n| case | call | direct | through manaproxy | difference |\n|---|---|---|---|---|")
        for row in TABLE:
            print(row.line())


async def run_calls(base_url: str, model: str, calls: tuple[str, ...]) -> list[Outcome]:
    """The app: the real SDK with its default retries, making `calls` one after the other."""
    outcomes = []
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-app")  # max_retries: the default (2)
    try:
        for call in calls:
            started = perf_counter()
            try:
                await CALLS[call](client, model)
            except openai.APIError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                message = body.get("message") if isinstance(body.get("message"), str) else str(exc)
                status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
                outcomes.append(Outcome(type(exc).__name__, status, str(message), perf_counter() - started))
            else:
                outcomes.append(Outcome("-", 200, "", perf_counter() - started))
    finally:
        await client.close()
    return outcomes


# -- the upstreams -------------------------------------------------------------------------------------


def by_body(
    when: Callable[[Recorded], bool], then: Callable[..., Any], otherwise: Callable[..., Any]
) -> Callable[..., Any]:
    """A behavior: `then` for requests `when` matches, `otherwise` for the rest."""

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        return await (then if when(recorded) else otherwise)(request, recorded)

    return behave


def has_image(recorded: Recorded) -> bool:
    return b'"image_url"' in recorded.body


def is_embedding(recorded: Recorded) -> bool:
    return recorded.path.endswith("/embeddings")


CHAT_OK = json_reply(chat_completion("m"))


@dataclass(frozen=True)
class Case:
    name: str
    calls: tuple[str, ...]
    script: Callable[[FakeUpstream], None] = lambda up: None
    upstream: str = "fake"  # fake (scripted), restart (down 0.3 s as the call begins), dead (nothing listens)
    expect: tuple[str, ...] = field(default=())  # each call's exception class through manaproxy ("-": none)


def _queue(*behaviors: Any) -> Callable[[FakeUpstream], None]:
    def script(up: FakeUpstream) -> None:
        up.queue(*behaviors)
        up.default = CHAT_OK

    return script


def _default(behavior: Any) -> Callable[[FakeUpstream], None]:
    def script(up: FakeUpstream) -> None:
        up.default = behavior

    return script


CASES = [
    Case("429 429 200, no hint", ("chat",), _queue(status_reply(429, "slow down"), status_reply(429, "slow down"))),
    Case(
        "429 429 200, retry-after-ms only",
        ("chat",),
        _queue(*[status_reply(429, "slow down", headers={"retry-after-ms": "200"})] * 2),
    ),
    Case("upstream restarts for 0.3 s", ("chat",), upstream="restart"),
    Case("dead lone provider", ("chat",), upstream="dead", expect=("InternalServerError",)),
    Case(
        "images refused (llama.cpp 500), then text",
        ("image", "image", "chat"),
        _default(by_body(has_image, status_reply(500, NO_IMAGES), CHAT_OK)),
        expect=("InternalServerError", "InternalServerError", "-"),
    ),
    Case(
        "images fail (500 boom), then text",
        ("image", "image", "chat"),
        _default(by_body(has_image, status_reply(500, "boom"), CHAT_OK)),
        expect=("InternalServerError", "InternalServerError", "-"),
    ),
    Case(
        "embeddings 501 (no --embeddings), then chat",
        ("embeddings", "embeddings", "chat"),
        _default(by_body(is_embedding, status_reply(501, "This server does not support embeddings"), CHAT_OK)),
        expect=("InternalServerError", "InternalServerError", "-"),
    ),
    Case(
        "lone 500 on every try",
        ("chat",),
        _default(status_reply(500, "model crashed")),
        expect=("InternalServerError",),
    ),
]


class Restarting:
    """An OpenAI-compatible upstream on a fixed port that can go away and come back (a restart)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        async def models(request: web.Request) -> web.Response:
            return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

        async def complete(request: web.Request) -> web.Response:
            return web.json_response(chat_completion("m"))

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/chat/completions", complete)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def restart_for(self, seconds: float) -> None:
        await self.stop()
        await asyncio.sleep(seconds)
        await self.start()


@contextlib.asynccontextmanager
async def upstream_for(case: Case, make_upstream: Any) -> AsyncIterator[tuple[str, Callable[[], None]]]:
    """(base URL of a fresh upstream scripted for `case`, what to do just before the app's first call)."""
    if case.upstream == "dead":
        with socket_closed() as url:
            yield url, lambda: None
        return
    if case.upstream == "restart":
        upstream = Restarting()
        await upstream.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            yield upstream.base_url, lambda: tasks.append(asyncio.ensure_future(upstream.restart_for(0.3)))
            await asyncio.gather(*tasks)
        finally:
            await upstream.stop()
        return
    fake = await make_upstream(case.name)
    fake.models = ["m"]
    case.script(fake)
    yield fake.base_url, lambda: None


@contextlib.contextmanager
def socket_closed() -> Iterator[str]:
    yield f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


async def direct(case: Case, make_upstream: Any) -> list[Outcome]:
    async with upstream_for(case, make_upstream) as (base_url, before):
        before()
        await asyncio.sleep(0.05)  # as through manaproxy, whose startup probe runs meanwhile
        return await run_calls(base_url, "m", case.calls)


async def through(case: Case, make_upstream: Any, make_proxy: Any) -> list[Outcome]:
    async with upstream_for(case, make_upstream) as (base_url, before):
        # A restart begins as manaproxy starts: its startup probe fails too, and with the app's first try
        # that is `failure_threshold` failures: the provider's breaker opens (the worst case of a restart).
        before()
        proxy = await make_proxy(build_config({"a": base_url}, {"mana/x": ["a/m"]}, health=HEALTH), probes=True)
        await asyncio.sleep(0.05)  # the startup probe round
        return await run_calls(proxy.base_url, "mana/x", case.calls)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_direct_and_through_manaproxy_look_the_same_to_the_sdk(case: Case, make_upstream, make_proxy):
    # Both at once: the case's two runs share the wall clock (each has its own upstream and timings).
    direct_outcomes, through_outcomes = await asyncio.gather(
        direct(case, make_upstream), through(case, make_upstream, make_proxy)
    )

    rows = [
        Row(case.name, call, d, t) for call, d, t in zip(case.calls, direct_outcomes, through_outcomes, strict=True)
    ]
    TABLE.extend(rows)
    for row in rows:
        print(row.line())
    assert [row.differences for row in rows] == [[] for _ in rows]
    if case.expect:
        assert [outcome.error for outcome in through_outcomes] == list(case.expect)
    else:
        assert [outcome.error for outcome in through_outcomes] == ["-"] * len(rows)
