"""Through the Node `openai` SDK's own retries, manaproxy is indistinguishable from a direct call (issue 16).

test_sdk_retries.py's cases (helpers.py: `RETRY_CASES`), with the app in Node: tests/node/retries.mjs makes
the case's calls with the SDK's DEFAULT retries (maxRetries 2, honouring `retry-after-ms` / `Retry-After`),
once against the scripted upstream directly and once through manaproxy, and prints per call its outcome, the
error's class, status and message and the elapsed time. Each row must be the same both ways (the elapsed time
within a second), except the one inherent difference: a dead lone provider is APIConnectionError direct and
our 503 through a gateway. Run with `-s` to see the table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest

from .helpers import (
    NODE_DIR,
    NODE_TIMEOUT,
    RETRY_CASES,
    App,
    Launch,
    Outcome,
    RetryCase,
    Row,
    assert_indistinguishable,
    direct_and_through,
    node_env,
    print_table,
)

TABLE: list[Row] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[list[Row]]:
    """Print the whole "direct vs through manaproxy" table once the module's cases have run."""
    yield TABLE
    print_table(TABLE)


@pytest.fixture
async def node_app(node_bin: str) -> AsyncIterator[Launch]:
    """Start tests/node/retries.mjs in a Node process of its own, ready for the calls it will be told."""
    started: list[asyncio.subprocess.Process] = []

    async def launch() -> App:
        process = await asyncio.create_subprocess_exec(
            node_bin,
            str(NODE_DIR / "retries.mjs"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=node_env(),
        )
        started.append(process)
        assert process.stdout is not None
        ready = await asyncio.wait_for(process.stdout.readline(), NODE_TIMEOUT)
        assert ready == b'{"ready":true}\n', ready

        async def run_calls(base_url: str, model: str, calls: tuple[str, ...]) -> list[Outcome]:
            spec = json.dumps({"baseURL": base_url, "model": model, "calls": list(calls)}).encode() + b"\n"
            try:
                out, err = await asyncio.wait_for(process.communicate(spec), NODE_TIMEOUT)
            except TimeoutError:  # e.g. the SDK obeying a Retry-After of a whole breaker window
                raise AssertionError(f"the app's calls to {base_url} took over {NODE_TIMEOUT:g}s") from None
            assert process.returncode == 0, err.decode()
            outcomes = json.loads(out.decode().splitlines()[-1])["outcomes"]
            return [Outcome(o["error"], o["status"], o["message"], o["elapsed"]) for o in outcomes]

        return run_calls

    yield launch
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("case", RETRY_CASES, ids=[case.name for case in RETRY_CASES])
async def test_direct_and_through_manaproxy_look_the_same_to_the_node_sdk(
    case: RetryCase, node_app, make_upstream, make_proxy
):
    rows = await direct_and_through(case, node_app, make_upstream, make_proxy)

    assert_indistinguishable(case, rows, TABLE)
