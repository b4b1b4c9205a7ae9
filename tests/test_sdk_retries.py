"""Through the SDK's own retries, manaproxy is indistinguishable from a direct call (issue 16).

Each case scripts the same upstream twice — once called directly, once through manaproxy (a one-entry alias,
`failure_threshold: 2`, probes on) — and runs the same app calls with the real `openai` SDK and its DEFAULT
retries (`max_retries=2`, honouring `Retry-After`/`retry-after-ms`). Per call, the table compares the outcome,
the exception class, the status, the provider's message and the elapsed time (within a second of direct).
The cases and the table are shared with test_node_sdk_retries.py (helpers.py). Run with `-s` to see the table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Any

import openai
import pytest

from .helpers import (
    RETRY_CASES,
    App,
    Outcome,
    RetryCase,
    Row,
    assert_indistinguishable,
    direct_and_through,
    print_table,
)

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


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


async def python_app() -> App:
    return run_calls  # nothing to start: the SDK's client is made per case


# -- the table -----------------------------------------------------------------------------------------

TABLE: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[list[Row]]:
    """Print the whole "direct vs through manaproxy" table once the module's cases have run."""
    yield TABLE
    print_table(TABLE)


@pytest.mark.parametrize("case", RETRY_CASES, ids=[case.name for case in RETRY_CASES])
async def test_direct_and_through_manaproxy_look_the_same_to_the_sdk(case: RetryCase, make_upstream, make_proxy):
    rows = await direct_and_through(case, python_app, make_upstream, make_proxy)

    assert_indistinguishable(case, rows, TABLE)
