"""Hedged first bytes: when the attempt in flight is late, the next target starts beside it and the first to
answer wins; the loser's connection is closed at once and it counts as neither a failure nor a fallback.
Nothing is raced once an answer has begun."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import pytest

from manaproxy.config import ConfigError, parse_config

from .fakes import (
    Recorded,
    chat_answer,
    chat_chunks,
    chat_completion,
    gated_stream,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import CHAT, build_config, chat, value

SLOW = 1.5  # seconds the late upstream takes: far past hedge_after, short enough for a test


def late(model: str, seconds: float = SLOW):
    """An answer that comes `seconds` late, streamed or not as asked; records when the proxy hung up."""
    streamed = sse_reply(chat_chunks(model, ["late"]), first_delay=seconds)
    unstreamed = json_reply(chat_completion(model), delay=seconds)

    async def behave(request: Any, recorded: Recorded) -> Any:
        stream = recorded.json.get("stream") is True
        return await (streamed if stream else unstreamed)(request, recorded)

    return behave


async def hedged_proxy(make_upstream, make_proxy, *, hedge_after: Any = 0.1, **alias: Any):
    a = await make_upstream("a")
    b = await make_upstream("b")
    c = await make_upstream("c")
    for up, model in ((a, "m1"), (b, "m2"), (c, "m3")):
        up.default = chat_answer(model)
    # These tests are about the race: every late request may hedge (the budget has tests of its own).
    spec = {"chain": ["a/m1", "b/m2", "c/m3"], "hedge_after": hedge_after, "hedge_budget_percent": 100, **alias}
    proxy = await make_proxy(build_config({"a": a, "b": b, "c": c}, {"mana/x": spec}))
    return a, b, c, proxy


async def answered_by(proxy, *, stream: bool) -> tuple[str, bytes]:
    resp = await proxy.client.post(CHAT, json=chat(stream=stream))
    body = await resp.read()
    assert resp.status == 200, body
    return resp.headers["X-Mana-LLM-Resolved"], body


@pytest.mark.parametrize("stream", [False, True])
async def test_a_slow_primary_is_beaten_by_the_hedge_and_hung_up_on(make_upstream, make_proxy, stream, caplog):
    a, _b, c, proxy = await hedged_proxy(make_upstream, make_proxy)
    a.default = late("m1")
    caplog.set_level(logging.INFO, logger="manaproxy.request")

    started = time.monotonic()
    resolved, body = await answered_by(proxy, stream=stream)

    assert resolved == "b/m2"
    assert time.monotonic() - started < SLOW / 2  # the hedge's answer, not the late one
    assert body.count(b'"model":"b/m2"') >= 1
    assert b"a/m1" not in body
    await wait_for(lambda: a.requests[0].disconnected.is_set(), timeout=2)  # the loser's upstream was closed
    assert c.calls == 0  # hedge_max 1: one extra attempt at a time
    assert value(proxy, "mana_llm_hedged_requests_total", alias="mana/x", outcome="hedge_won") == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "manaproxy.request"]
    assert "attempts=a/m1:hedged_lost,b/m2:won" in line


def hedged_series(proxy) -> dict[str, float]:
    """Every `mana_llm_hedged_requests_total` series there is, by outcome: a request that never hedged adds none."""
    return {
        sample.labels["outcome"]: sample.value
        for metric in proxy.registry.collect()
        if metric.name == "mana_llm_hedged_requests"
        for sample in metric.samples
        if sample.name == "mana_llm_hedged_requests_total"
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_a_fast_primary_is_never_hedged(make_upstream, make_proxy, stream):
    a, b, _c, proxy = await hedged_proxy(make_upstream, make_proxy, hedge_after=0.3)

    for _ in range(5):
        assert (await answered_by(proxy, stream=stream))[0] == "a/m1"

    assert (a.calls, b.calls) == (5, 0)
    assert hedged_series(proxy) == {}  # not even a series at 0
    # The control: one late primary, and the series this test looks for is there.
    a.default = late("m1", 0.6)
    assert (await answered_by(proxy, stream=stream))[0] == "b/m2"
    assert hedged_series(proxy) == {"hedge_won": 1}


async def test_a_primary_that_answers_after_the_hedge_started_still_wins(make_upstream, make_proxy):
    a, b, _c, proxy = await hedged_proxy(make_upstream, make_proxy)
    a.default = late("m1", 0.3)  # later than hedge_after (0.1), earlier than the hedge
    b.default = late("m2", 5)

    resolved, _ = await answered_by(proxy, stream=True)

    assert resolved == "a/m1"
    assert b.calls == 1  # the hedge was started ...
    await wait_for(lambda: b.requests[0].disconnected.is_set(), timeout=2)  # ... and cancelled at once
    assert value(proxy, "mana_llm_hedged_requests_total", alias="mana/x", outcome="primary_won") == 1


async def test_the_loser_is_hung_up_on_at_the_commit_not_at_the_end_of_the_answer(make_upstream, make_proxy):
    a, b, _c, proxy = await hedged_proxy(make_upstream, make_proxy)
    a.default = late("m1", 5)
    gate = asyncio.Event()
    b.default = gated_stream(gate, "m2")  # the winner's answer goes on until the test lets it end

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    assert await resp.content.readuntil(b"\n\n")  # committed: the first event is relayed
    await wait_for(lambda: bool(a.requests) and a.requests[0].disconnected.is_set(), timeout=3)
    gate.set()
    body = await resp.read()

    assert body.endswith(b"data: [DONE]\n\n")


async def test_each_further_hedge_waits_hedge_after_from_the_one_before(make_upstream, make_proxy):
    hedge_after = 0.4
    a, b, c, proxy = await hedged_proxy(make_upstream, make_proxy, hedge_after=hedge_after, hedge_max=2)
    arrived: dict[str, float] = {}

    def timed(name: str, model: str) -> Any:
        behave = late(model, 2.0)

        async def record_arrival(request: Any, recorded: Recorded) -> Any:
            arrived[name] = time.monotonic()
            return await behave(request, recorded)

        return record_arrival

    a.default, b.default, c.default = timed("a", "m1"), timed("b", "m2"), timed("c", "m3")

    resolved, _ = await answered_by(proxy, stream=True)

    assert resolved == "a/m1"
    assert set(arrived) == {"a", "b", "c"}  # two hedges at once (hedge_max 2)
    assert arrived["b"] - arrived["a"] >= hedge_after / 2
    assert arrived["c"] - arrived["b"] >= hedge_after / 2  # timed from b, the youngest, not from a


async def test_a_cancelled_loser_counts_as_neither_failure_nor_fallback(make_upstream, make_proxy):
    a, _b, _c, proxy = await hedged_proxy(make_upstream, make_proxy)
    a.default = late("m1")
    health = proxy.gateway.health

    for _ in range(3):
        assert (await answered_by(proxy, stream=True))[0] == "b/m2"

    loser = health.target("a", "m1").breaker
    assert (loser.consecutive_failures, loser.last_error, health.breaker("a", "m1")) == (0, None, "closed")
    assert health.breaker("a") == "closed"
    assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason="hedged_lost") == 0


async def test_a_failure_while_a_hedge_runs_falls_back_beside_the_survivor(make_upstream, make_proxy):
    a, b, c, proxy = await hedged_proxy(make_upstream, make_proxy)
    gate = asyncio.Event()

    async def late_failure(request: Any, recorded: Recorded) -> Any:
        await asyncio.sleep(0.25)  # after the hedge started
        gate.set()
        return await status_reply(503)(request, recorded)

    a.default = late_failure
    b.default = late("m2", 5)  # the hedge is slow too
    c.default = late("m3", 0.2)

    resolved, _ = await answered_by(proxy, stream=False)

    assert gate.is_set()
    assert resolved == "c/m3"  # started when a failed, beside b; it answered first
    await wait_for(lambda: b.requests[0].disconnected.is_set(), timeout=2)
    assert proxy.gateway.health.target("a", "m1").breaker.consecutive_failures == 1  # a real failure counts
    assert value(proxy, "mana_llm_hedged_requests_total", alias="mana/x", outcome="primary_won") == 1


async def test_a_fallback_that_beats_its_own_hedge_is_no_hedge_win(make_upstream, make_proxy, caplog):
    a, b, c, proxy = await hedged_proxy(make_upstream, make_proxy)
    a.default = status_reply(500)
    b.default = late("m2", 0.4)  # the fallback after a's failure: late, so c starts beside it
    c.default = late("m3", 5)
    caplog.set_level(logging.INFO, logger="manaproxy.request")

    resolved, _ = await answered_by(proxy, stream=False)

    assert resolved == "b/m2"
    assert c.calls == 1
    assert value(proxy, "mana_llm_hedged_requests_total", alias="mana/x", outcome="primary_won") == 1
    assert value(proxy, "mana_llm_hedged_requests_total", alias="mana/x", outcome="hedge_won") == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "manaproxy.request"]
    assert "attempts=a/m1:http_500,c/m3:hedged_lost,b/m2:won" in line


async def test_nothing_is_raced_once_an_answer_has_begun(make_upstream, make_proxy):
    a, b, _c, proxy = await hedged_proxy(make_upstream, make_proxy)
    a.default = sse_reply(chat_chunks("m1", ["one", "two", "three"]), delay=0.3)  # first event at once, then slow

    resolved, body = await answered_by(proxy, stream=True)

    assert resolved == "a/m1"
    assert body.endswith(b"data: [DONE]\n\n")
    assert b.calls == 0


async def test_auto_hedges_at_the_p95_of_the_first_targets_recent_first_bytes(make_upstream, make_proxy):
    a, b, _c, proxy = await hedged_proxy(make_upstream, make_proxy, hedge_after="auto", hedge_min=0.05)

    async def hedge_view() -> Any:
        (alias,) = (await (await proxy.client.get("/v1/aliases")).json())["aliases"]
        return alias["hedge"]

    assert (await hedge_view())["delay_seconds"] == {"stream": None, "unstreamed": None}
    for _ in range(19):  # below 20 samples: no hedging, however late
        await answered_by(proxy, stream=False)
    a.queue(late("m1", 0.4))
    assert (await answered_by(proxy, stream=False))[0] == "a/m1"
    assert b.calls == 0

    for _ in range(20):  # fast answers: the p95 falls below hedge_min, which bounds it
        await answered_by(proxy, stream=False)
    assert (await hedge_view())["delay_seconds"]["unstreamed"] == 0.05
    a.queue(late("m1", 0.6))
    assert (await answered_by(proxy, stream=False))[0] == "b/m2"  # late against that: hedged

    a.default = late("m1", 0.12)  # the first target gets slower for everyone (and stays the faster one) ...
    b.default = late("m2", 5)
    for _ in range(45):  # more than half of a window of 86: the median (which bounds the p95) moves too
        assert (await answered_by(proxy, stream=False))[0] == "a/m1"
    delay = (await hedge_view())["delay_seconds"]["unstreamed"]
    assert 0.1 <= delay <= 0.2  # ... and the delay follows it: late requests are hedged again, not all of them


@pytest.mark.parametrize(
    ("alias", "place", "message"),
    [
        ({"chain": [[]]}, r"aliases.mana/x.chain\[0\]", "at least one member"),
        ({"chain": [["a/m", ["a/n"]]]}, r"aliases.mana/x.chain\[0\]\[1\]", "cannot be nested"),
        ({"chain": [["nope/m"]]}, r"aliases.mana/x.chain\[0\]\[0\]", "undeclared provider"),
        ({"chain": [[{"target": "a/m", "weight": 0}]]}, r"chain\[0\]\[0\].weight", "must be > 0"),
        ({"chain": [[{"target": "a/m", "weight": -2}]]}, r"chain\[0\]\[0\].weight", "must be >= 0|must be > 0"),
        ({"chain": [[{"weight": 2}]]}, r"chain\[0\]\[0\]", "needs a target"),
        ({"chain": ["a/m"], "hedge_after": 0}, "hedge_after", "must be > 0 seconds or 'auto'"),
        ({"chain": ["a/m"], "hedge_after": "soon"}, "hedge_after", "expected a number"),
        ({"chain": ["a/m"], "hedge_max": 2}, "hedge_max", "applies only with hedge_after"),
        ({"chain": ["a/m"], "hedge_after": "auto", "hedge_max": 0}, "hedge_max", "must be >= 1"),
        ({"chain": ["a/m"], "hedge_after": 1, "hedge_budget_percent": -1}, "hedge_budget_percent", "must be >= 0"),
        (
            {"chain": ["a/m"], "hedge_after": 1, "hedge_budget_percent": 150},
            "hedge_budget_percent",
            "<= 100 x hedge_max",
        ),
        ({"chain": ["a/m"], "hedge_budget_percent": 5}, "hedge_budget_percent", "applies only with hedge_after"),
        (
            {"chain": ["a/m"], "hedge_after": "auto", "hedge_min": 2, "hedge_max_delay": 1},
            "hedge_max_delay",
            ">= hedge_min",
        ),
    ],
)
def test_bad_pool_and_hedge_settings_are_refused_with_their_place(alias, place, message):
    text = build_config({"a": "http://127.0.0.1:9/v1"}, {"mana/x": alias})
    with pytest.raises(ConfigError, match=f"{place}.*({message})"):
        parse_config(text, env={})


async def test_check_names_the_place_of_a_bad_pool(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(build_config({"a": "http://127.0.0.1:9/v1"}, {"mana/x": {"chain": [["a/m", ["a/n"]]]}}))

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "manaproxy", "check", "--config", str(path), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await proc.communicate()

    assert proc.returncode == 1
    assert b"aliases.mana/x.chain[0][1]: pools cannot be nested" in stderr


# -- hedge_after: auto cannot be steered by one client; hedge_budget_percent bounds the cost ------------------


async def unstreamed_delay(proxy, key: str | None = None) -> float | None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    (alias,) = (await (await proxy.client.get("/v1/aliases", headers=headers)).json())["aliases"]
    return alias["hedge"]["delay_seconds"]["unstreamed"]


async def test_a_few_slow_requests_cannot_push_the_auto_delay_up_to_no_hedging(make_upstream, make_proxy):
    a, b, _c, proxy = await hedged_proxy(make_upstream, make_proxy, hedge_after="auto", hedge_min=0.05)
    for _ in range(30):  # the first target answers at once
        await answered_by(proxy, stream=False)
    a.default = late("m1", 1.0)
    b.default = late("m2", 5)  # a wins each race: its slow answers are what is learnt

    answers = await asyncio.gather(*(answered_by(proxy, stream=False) for _ in range(12)))
    assert {resolved for resolved, _ in answers} == {"a/m1"}

    delay = await unstreamed_delay(proxy)
    assert delay is not None
    assert delay <= 0.1
    a.default = late("m1", 0.6)
    b.default = chat_answer("m2")
    assert (await answered_by(proxy, stream=False))[0] == "b/m2"  # late requests are still hedged


async def test_one_client_key_flooding_instant_answers_cannot_pull_the_auto_delay_down(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = late("m1", 0.15)
    b.default = late("m2", 5)
    spec = {"chain": ["a/m1", "b/m2"], "hedge_after": "auto", "hedge_min": 0.05, "hedge_budget_percent": 100}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": spec}), api_keys=[b"key-legit", b"key-flood"])

    async def post(key: str) -> str:
        resp = await proxy.client.post(CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Mana-LLM-Resolved"]

    for _ in range(3):  # 60 answers for the legitimate client, 0.15 s each
        await asyncio.gather(*(post("key-legit") for _ in range(20)))
    before = await unstreamed_delay(proxy, "key-legit")
    assert before is not None
    assert before >= 0.14

    a.default = chat_answer("m1")
    for _ in range(6):  # 300 instant answers for one other key
        await asyncio.gather(*(post("key-flood") for _ in range(50)))

    delay = await unstreamed_delay(proxy, "key-legit")
    assert delay is not None
    assert delay >= 0.14
    a.default = late("m1", 0.1)
    calls = b.calls
    assert await post("key-legit") == "a/m1"
    assert b.calls == calls  # an answer in its usual time is not hedged


async def test_the_hedge_budget_caps_the_extra_upstream_requests(make_upstream, make_proxy):
    a, b, c, proxy = await hedged_proxy(make_upstream, make_proxy, hedge_after=0.05, hedge_budget_percent=10)
    a.default = late("m1", 0.2)  # every request is late: each would hedge without a budget

    for _ in range(4):
        answers = await asyncio.gather(*(answered_by(proxy, stream=False) for _ in range(10)))
        assert all(resolved in ("a/m1", "b/m2") for resolved, _ in answers)

    assert a.calls == 40
    assert 1 <= b.calls + c.calls <= 1 + 4  # a reserve of one, and 10 % of 40 requests


async def test_a_rate_limited_entry_never_goes_as_a_hedge_but_still_as_the_last_resort(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = late("m1", 0.4)
    b.queue(status_reply(429, "slow down", headers={"retry-after-ms": "30000"}))
    b.default = chat_answer("m2")
    spec = {"chain": ["b/m2", "a/m1"], "hedge_after": 0.1, "hedge_budget_percent": 100}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": spec}))
    assert (await proxy.client.post(CHAT, json=chat())).status == 200  # b: 429, then a (late) answers

    late_answer = await proxy.client.post(CHAT, json=chat())  # a is late, b rate-limited: no hedge to b
    a.default = status_reply(500)
    last_resort = await proxy.client.post(CHAT, json=chat())  # a fails: b is the only entry left

    assert (late_answer.status, late_answer.headers["X-Mana-LLM-Resolved"]) == (200, "a/m1")
    assert (last_resort.status, last_resort.headers["X-Mana-LLM-Resolved"]) == (200, "b/m2")
    assert b.calls == 2


async def test_a_failed_hedge_is_not_replaced_by_a_rate_limited_entry_while_the_primary_runs(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    c = await make_upstream("c")
    b.queue(status_reply(429, "slow down", headers={"retry-after-ms": "30000"}))
    b.default, a.default, c.default = chat_answer("m2"), chat_answer("m1"), chat_answer("m3")
    spec = {"chain": ["b/m2", "a/m1", "c/m3"], "hedge_after": 0.1, "hedge_budget_percent": 100}
    proxy = await make_proxy(build_config({"a": a, "b": b, "c": c}, {"mana/x": spec}))
    assert (await proxy.client.post(CHAT, json=chat())).status == 200  # b: 429, rate-limited for 30 s
    a.default = late("m1", 0.6)  # slow, but it will answer
    c.default = status_reply(500)  # the hedge fails at once, while a still runs

    resolved, _ = await answered_by(proxy, stream=False)

    assert resolved == "a/m1"
    assert (b.calls, c.calls) == (1, 1)  # b, the last resort, waits for nothing else to be in flight


async def test_an_entry_a_hedge_skipped_is_a_fallback_only_when_the_answer_came_from_past_it(
    make_upstream, make_proxy, caplog
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    c = await make_upstream("c")
    gate = asyncio.Event()
    b.default = gated_stream(gate, "m2")  # holds b's only place
    a.default, c.default = late("m1", 0.3), late("m3", 2)
    providers = {"a": a, "b": {"base_url": b, "max_concurrent": 1}, "c": c}
    spec = {"chain": ["a/m1", "b/m2", "c/m3"], "hedge_after": 0.1, "hedge_budget_percent": 100}
    proxy = await make_proxy(build_config(providers, {"mana/x": spec}))
    holder = asyncio.create_task(proxy.client.post(CHAT, json=chat("b/m2", stream=True)))
    await wait_for(lambda: b.calls == 1)
    caplog.set_level(logging.INFO, logger="manaproxy.request")

    assert (await answered_by(proxy, stream=False))[0] == "a/m1"  # the hedge skipped b (full), went to c
    a.default, c.default = late("m1", 2), chat_answer("m3")
    assert (await answered_by(proxy, stream=False))[0] == "c/m3"  # now the hedge, past b, answers

    primary_won, hedge_won = [r.getMessage() for r in caplog.records if "model=mana/x" in r.getMessage()]
    assert "attempts=c/m3:hedged_lost,a/m1:won" in primary_won  # b was never fallen back past
    assert "attempts=b/m2:saturated,a/m1:hedged_lost,c/m3:won" in hedge_won
    assert value(proxy, "mana_llm_fallback_total", from_model="b/m2", to_model="c/m3", reason="saturated") == 1
    gate.set()
    await (await holder).read()
