"""Pools of equivalent targets share a chain step: the least loaded member (per unit of weight) serves, ties
go at random in proportion to weight, a member that fails or is down is covered by the others, then by the
next step. Also: pools and hedging together across a reload, and what /v1/aliases shows."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from .fakes import (
    Recorded,
    chat_answer,
    chat_chunks,
    chat_completion,
    closed_port_url,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import CHAT, build_config, chat


async def pool_proxy(make_upstream, make_proxy, pool: list[Any], **alias: Any):
    gpu1 = await make_upstream("gpu1")
    gpu2 = await make_upstream("gpu2")
    backup = await make_upstream("backup")
    for up in (gpu1, gpu2, backup):
        up.default = chat_answer("served")
    providers = {"gpu1": gpu1, "gpu2": gpu2, "backup": backup}
    spec = {"chain": [pool, "backup/b"], **alias}
    proxy = await make_proxy(build_config(providers, {"mana/x": spec}, health={"failure_threshold": 1}))
    return gpu1, gpu2, backup, proxy


async def served_by(proxy, requests: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(requests):
        resp = await proxy.client.post(CHAT, json=chat())
        await resp.read()
        counts[resp.headers["X-Mana-LLM-Resolved"]] += 1
    return counts


async def test_an_unweighted_pool_shares_its_requests(make_upstream, make_proxy):
    _, _, backup, proxy = await pool_proxy(make_upstream, make_proxy, ["gpu1/q", "gpu2/q"])

    counts = await served_by(proxy, 200)

    assert set(counts) == {"gpu1/q", "gpu2/q"}
    assert 60 <= counts["gpu1/q"] <= 140  # 100 expected; this bound fails once in ~10^8 runs
    assert backup.calls == 0


async def test_a_weighted_pool_shares_in_proportion_to_weight(make_upstream, make_proxy):
    pool = [{"target": "gpu1/q", "weight": 3}, {"target": "gpu2/q", "weight": 1}]
    _, _, _, proxy = await pool_proxy(make_upstream, make_proxy, pool)

    counts = await served_by(proxy, 400)

    assert 250 <= counts["gpu1/q"] <= 350  # 300 expected (75 %)


async def test_the_least_loaded_member_serves_first(make_upstream, make_proxy):
    gpu1, gpu2, _, proxy = await pool_proxy(make_upstream, make_proxy, ["gpu1/q", "gpu2/q"])
    gate = asyncio.Event()

    async def held(request: Any, recorded: Recorded) -> Any:
        await gate.wait()
        return await json_reply(chat_completion("q"))(request, recorded)

    gpu1.default = gpu2.default = held
    first = asyncio.create_task(proxy.client.post(CHAT, json=chat()))
    await wait_for(lambda: gpu1.calls + gpu2.calls == 1)
    busy, idle = (gpu1, gpu2) if gpu1.calls else (gpu2, gpu1)
    second = asyncio.create_task(proxy.client.post(CHAT, json=chat()))
    await wait_for(lambda: idle.calls == 1)  # the one with nothing in flight

    gate.set()
    for task in (first, second):
        (await task).release()
    assert (busy.calls, idle.calls) == (1, 1)


async def test_load_is_counted_per_unit_of_weight(make_upstream, make_proxy):
    pool = [{"target": "gpu1/q", "weight": 3}, {"target": "gpu2/q", "weight": 1}]
    gpu1, gpu2, _, proxy = await pool_proxy(make_upstream, make_proxy, pool)
    gate = asyncio.Event()

    async def held(request: Any, recorded: Recorded) -> Any:
        await gate.wait()
        return await json_reply(chat_completion("q"))(request, recorded)

    gpu1.default = gpu2.default = held
    tasks = []
    for sent in range(1, 5):  # one at a time, each once the one before is in flight
        tasks.append(asyncio.create_task(proxy.client.post(CHAT, json=chat())))
        await wait_for(lambda sent=sent: gpu1.calls + gpu2.calls == sent)
    in_flight = (gpu1.calls, gpu2.calls)
    gate.set()
    for task in tasks:
        (await task).release()

    # Whichever the first tie picks, 3:1 weights end at 3 and 1 in flight (counted unweighted: 2 and 2).
    assert in_flight == (3, 1)


async def test_a_member_that_is_down_is_covered_by_the_other(make_upstream, make_proxy):
    gpu2 = await make_upstream("gpu2")
    backup = await make_upstream("backup")
    gpu2.default = backup.default = chat_answer("served")
    providers = {"gpu1": closed_port_url(), "gpu2": gpu2, "backup": backup}
    spec = {"chain": [["gpu1/q", "gpu2/q"], "backup/b"]}
    proxy = await make_proxy(build_config(providers, {"mana/x": spec}, health={"failure_threshold": 1}))

    counts = await served_by(proxy, 20)

    assert counts == {"gpu2/q": 20}  # never the backup: the pool's other member covers
    assert proxy.gateway.health.breaker("gpu1") == "open"


async def test_a_failing_member_is_followed_by_the_others_then_the_next_step(make_upstream, make_proxy):
    gpu1, gpu2, backup, proxy = await pool_proxy(make_upstream, make_proxy, ["gpu1/q", "gpu2/q"])
    gpu1.default = gpu2.default = status_reply(503)

    resp = await proxy.client.post(CHAT, json=chat())
    await resp.read()

    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/b"
    assert (gpu1.calls, gpu2.calls, backup.calls) == (1, 1, 1)


async def test_aliases_show_pools_with_weights_and_the_hedge_setting(make_upstream, make_proxy):
    pool = [{"target": "gpu1/q", "weight": 3}, "gpu2/q"]
    _, _, _, proxy = await pool_proxy(make_upstream, make_proxy, pool, hedge_after=0.8)
    plain = await make_proxy(build_config({"a": "http://127.0.0.1:9/v1"}, {"mana/p": ["a/m"]}))

    (alias,) = (await (await proxy.client.get("/v1/aliases")).json())["aliases"]
    (unchanged,) = (await (await plain.client.get("/v1/aliases")).json())["aliases"]

    assert alias["chain"] == [[{"target": "gpu1/q", "weight": 3.0}, {"target": "gpu2/q", "weight": 1.0}], "backup/b"]
    assert [(e["target"], e["step"], e["weight"], e["available"]) for e in alias["entries"]] == [
        ("gpu1/q", 0, 3.0, True),
        ("gpu2/q", 0, 1.0, True),
        ("backup/b", 1, 1.0, True),
    ]
    assert alias["hedge"] == {"after": 0.8, "delay_seconds": 0.8, "max": 1}
    assert set(unchanged) == {"name", "description", "chain", "serving", "entries"}  # a plain chain's shape
    assert set(unchanged["entries"][0]) == {"target", "available", "reason"}


async def test_pools_and_hedging_survive_a_reload(make_upstream, make_proxy, tmp_path):
    gpu1, gpu2, backup, proxy = await pool_proxy(
        make_upstream, make_proxy, ["gpu1/q", "gpu2/q"], hedge_after=0.1, hedge_max=2, hedge_budget_percent=200
    )  # a budget for two hedges in one request
    gpu1.default = gpu2.default = sse_reply(chat_chunks("q", ["late"]), first_delay=2)  # the pool is late

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    await resp.read()
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/b"  # hedged across the pool, then to the next step
    assert (gpu1.calls, gpu2.calls) == (1, 1)

    providers = {"gpu1": gpu1, "gpu2": gpu2, "backup": backup}
    assert proxy.reload_to(tmp_path, build_config(providers, {"mana/x": {"chain": [["gpu2/q"], "backup/b"]}}))
    gpu2.default = chat_answer("served")
    counts = await served_by(proxy, 5)
    assert counts == {"gpu2/q": 5}  # no hedging any more, and gpu1 left the pool
    assert gpu1.calls == 1
