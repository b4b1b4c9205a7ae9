"""`max_concurrent: auto` end to end: a target learns how many requests it serves at once, spills the rest
to the next chain entry, and a request that finds every entry full waits for the first free place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from .fakes import Slots, chat_answer, gated_stream, status_reply, wait_for
from .helpers import CHAT, build_config, chat

AUTO = {"max_concurrent": "auto"}


async def gpu_and_cloud(make_upstream, make_proxy, gpu: Slots, spec=None, *, health=None):
    """mana/x = [gpu/m1 (auto), cloud/m2]: the fake GPU serves `gpu.k` at once, the cloud anything at once."""
    a = await make_upstream("gpu")
    b = await make_upstream("cloud")
    a.default = gpu.behavior()
    b.default = chat_answer("m2")
    providers = {"gpu": {"base_url": a, **AUTO, **(spec or {})}, "cloud": b}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["gpu/m1", "cloud/m2"]}, health=health))
    return a, b, proxy


async def learned(proxy) -> dict:
    resp = await proxy.client.get("/v1/health")
    return (await resp.json())["providers"]["gpu"]["models"]["m1"]


async def load(proxy, clients: int, seconds: float) -> list[str]:
    """`clients` callers asking one after the other for `seconds`: who answered each request."""
    served: list[str] = []
    until = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < until:
            resp = await proxy.client.post(CHAT, json=chat(stream=True))
            assert resp.status == 200, await resp.text()
            await resp.read()
            served.append(resp.headers["X-Mana-LLM-Resolved"])

    await asyncio.gather(*(caller() for _ in range(clients)))
    return served


async def test_a_target_at_its_learned_limit_spills_to_the_next_entry(make_upstream, make_proxy):
    gpu = Slots(4, prefill=0.5, words=2)  # no answer yet when the second request comes: nothing learned
    _a, _b, proxy = await gpu_and_cloud(make_upstream, make_proxy, gpu)
    first = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: gpu.serving == 1)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))  # the limit starts at 1

    assert resp.headers["X-Mana-LLM-Resolved"] == "cloud/m2"
    await resp.read()
    assert (await learned(proxy))["concurrency"]["limit"] == 1
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'mana_llm_concurrency_limit{target="gpu/m1"} 1.0' in metrics
    assert 'mana_llm_fallback_total{from_model="gpu/m1",reason="saturated",to_model="cloud/m2"} 1.0' in metrics
    assert (await first).headers["X-Mana-LLM-Resolved"] == "gpu/m1"


async def load_until(proxy, reached: Callable[[dict], bool], least: float = 2.0, most: float = 8.0) -> list[str]:
    """`load` with six callers for `least` seconds, then by the second until the learned view is `reached` (at
    most `most` seconds in all: a loaded machine learns as surely, if more slowly, and the assertions after it
    say what was learned)."""
    deadline = time.monotonic() + most
    served = await load(proxy, clients=6, seconds=least)
    while not reached(await learned(proxy)) and time.monotonic() < deadline:
        served += await load(proxy, clients=6, seconds=1.0)
    return served


async def test_the_limit_grows_at_the_floor_within_its_bounds_and_shrinks_when_latency_rises(make_upstream, make_proxy):
    # A floor (0.4 s) and a queue (a whole 0.9 s answer on top) each 0.45 s from the line between them (2 x the
    # floor + 50 ms): a busy CI machine's scheduling stalls (seen: over 0.15 s) decide neither.
    gpu = Slots(8, words=10, prefill=0.4)
    _a, _b, proxy = await gpu_and_cloud(make_upstream, make_proxy, gpu, {"max_concurrent_limit": 3})

    served = await load_until(proxy, lambda view: view["concurrency"]["limit"] == 3)

    view = await learned(proxy)
    assert view["concurrency"]["limit"] == 3  # grown from 1 while the first byte stayed at its floor: capped
    assert gpu.most == 3  # the bound held: the GPU never had more
    assert set(view["concurrency"]["floor_seconds"]) == {"ttfb"}
    assert served.count("gpu/m1") >= 1 + 2  # the answers at the limit that grew it: one at 1, two at 2

    gpu.k = 1  # another process took most of the GPU: requests past the first queue there
    await load_until(proxy, lambda view: view["concurrency"]["limit"] == 1)

    view = await learned(proxy)
    assert view["concurrency"]["limit"] == 1
    assert view["concurrency"]["ceiling"] in (2, 3)


async def test_every_entry_saturated_waits_for_the_first_free_place(make_upstream, make_proxy):
    gpu, cloud = Slots(1, words=6), Slots(1, model="m2", words=6)
    a = await make_upstream("gpu")
    b = await make_upstream("cloud")
    a.default, b.default = gpu.behavior(), cloud.behavior()
    one = {**AUTO, "max_concurrent_limit": 1}  # learning aside: one place each, taken by the first two
    providers = {"gpu": {"base_url": a, **one}, "cloud": {"base_url": b, **one}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["gpu/m1", "cloud/m2"]}))

    replies = await asyncio.gather(*(proxy.client.post(CHAT, json=chat(stream=True)) for _ in range(4)))

    assert [resp.status for resp in replies] == [200] * 4  # two served at once, two waited, none refused
    assert (gpu.most, cloud.most) == (1, 1)  # neither entry was sent more than its learned limit
    assert (a.calls, b.calls) in ((2, 2), (3, 1))
    for resp in replies:
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


async def test_the_wait_for_a_place_ends_at_the_first_entrys_first_byte_timeout(make_upstream, make_proxy):
    gpu = Slots(1, words=40, per_word=0.05)  # a two-second answer holds the only place
    _a, _b, proxy = await make_proxy_alone(make_upstream, make_proxy, gpu)
    holder = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: gpu.serving == 1)
    started = time.monotonic()

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.status == 503
    assert (await resp.json())["error"]["message"].endswith("gpu/m1=saturated")
    assert 0.4 <= time.monotonic() - started < 1.5
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)


async def make_proxy_alone(make_upstream, make_proxy, gpu: Slots):
    a = await make_upstream("gpu")
    a.default = gpu.behavior()
    providers = {"gpu": {"base_url": a, **AUTO, "timeouts": {"first_byte": 0.5}}}
    return a, None, await make_proxy(build_config(providers, {"mana/x": ["gpu/m1"]}))


async def test_a_failing_targets_limit_does_not_collapse_and_it_serves_again(make_upstream, make_proxy):
    gpu = Slots(8, words=4, prefill=0.6)  # a floor 0.65 s from the line of a queue: a loaded machine's stalls are less
    a, _b, proxy = await gpu_and_cloud(make_upstream, make_proxy, gpu, health={"failure_threshold": 1})
    await load(proxy, clients=3, seconds=1.5)
    grown = (await learned(proxy))["concurrency"]["limit"]
    assert grown >= 2

    a.default = status_reply(500)  # the model breaks: its breaker keeps it out, the cloud answers
    served = await load(proxy, clients=3, seconds=0.5)
    assert served.count("cloud/m2") >= 3
    assert (await learned(proxy))["concurrency"]["limit"] == grown  # failures teach the limiter nothing

    a.default = gpu.behavior()  # well again
    served = await load(proxy, clients=3, seconds=2.5)  # the breaker's trial (after 1 s) finds it well
    assert "gpu/m1" in served[-3:]
    assert (await learned(proxy))["concurrency"]["limit"] >= grown


async def test_a_pool_member_s_own_limit_holds_for_that_target(make_upstream, make_proxy):
    gpu = Slots(4, prefill=0.5, words=2)
    a = await make_upstream("gpu")
    b = await make_upstream("cloud")
    a.default, b.default = gpu.behavior(), chat_answer("m2")
    chain = [[{"target": "gpu/m1", "max_concurrent": "auto", "max_concurrent_limit": 2}], "cloud/m2"]
    proxy = await make_proxy(build_config({"gpu": a, "cloud": b}, {"mana/x": {"chain": chain}}))  # no provider limit
    first = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: gpu.serving == 1)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.headers["X-Mana-LLM-Resolved"] == "cloud/m2"  # the member's learned limit: 1 until it answers
    await resp.read()
    assert (await learned(proxy))["concurrency"]["max_concurrent_limit"] == 2
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'mana_llm_concurrency_limit{target="gpu/m1"} 1.0' in metrics
    assert 'mana_llm_concurrency_limit{target="cloud/m2"}' not in metrics  # no limit, no series
    assert (await first).headers["X-Mana-LLM-Resolved"] == "gpu/m1"


async def test_a_hedge_never_starts_on_a_saturated_target_and_a_hedged_request_waits_too(make_upstream, make_proxy):
    gpu, cloud = Slots(1, prefill=0.3, words=2), Slots(1, model="m2", prefill=0.3, words=2)
    a = await make_upstream("gpu")
    b = await make_upstream("cloud")
    a.default, b.default = gpu.behavior(), cloud.behavior()
    one = {**AUTO, "max_concurrent_limit": 1}
    providers = {"gpu": {"base_url": a, **one}, "cloud": {"base_url": b, **one}}
    aliases = {"mana/x": {"chain": ["gpu/m1", "cloud/m2"], "hedge_after": 0.05, "hedge_budget_percent": 100}}
    proxy = await make_proxy(build_config(providers, aliases))
    direct = asyncio.create_task(proxy.client.post(CHAT, json=chat("cloud/m2", stream=True)))  # the cloud is full
    await wait_for(lambda: cloud.serving == 1)

    hedged, waiting = await asyncio.gather(
        proxy.client.post(CHAT, json=chat(stream=True)), proxy.client.post(CHAT, json=chat(stream=True))
    )

    assert (hedged.status, waiting.status) == (200, 200)  # one served at once, the other after a wait
    assert (await direct).status == 200
    assert a.calls + b.calls == 3  # late past 50 ms, yet no hedge: it had nowhere to go but a full target
    assert (gpu.most, cloud.most) == (1, 1)


async def test_an_unstreamed_answer_is_timed_per_output_token(make_upstream, make_proxy):
    gpu = Slots(2, prefill=0.02, words=5, per_word=0.02)  # 5 tokens in ≈ 0.12 s: ≈ 0.024 s a token
    _a, _b, proxy = await gpu_and_cloud(make_upstream, make_proxy, gpu)

    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.headers["X-Mana-LLM-Resolved"] == "gpu/m1"
    floors = (await learned(proxy))["concurrency"]["floor_seconds"]
    assert set(floors) == {"per_token"}
    assert 0.02 <= floors["per_token"] < 0.1


async def gpu_full_and_cloud_rate_limited(make_upstream, make_proxy, gate: asyncio.Event):
    """mana/x = [gpu/m1 (one place, held by a stream until `gate`), cloud/m2 (rate-limited for 30 s)]."""
    a = await make_upstream("gpu")
    b = await make_upstream("cloud")
    a.default = gated_stream(gate, "m1")
    b.queue(status_reply(429, "slow down", headers={"retry-after-ms": "30000"}))
    b.default = chat_answer("m2")
    gpu = {"base_url": a, "max_concurrent": 1, "timeouts": {"first_byte": 0.6}}
    proxy = await make_proxy(build_config({"gpu": gpu, "cloud": b}, {"mana/x": ["gpu/m1", "cloud/m2"]}))
    assert (await proxy.client.post(CHAT, json=chat("cloud/m2"))).status == 429
    holder = asyncio.create_task(proxy.client.post(CHAT, json=chat("gpu/m1", stream=True)))
    await wait_for(lambda: a.calls == 1)
    a.default = chat_answer("m1")
    return a, b, proxy, holder


async def test_a_full_entry_is_waited_for_before_a_rate_limited_one_is_called(make_upstream, make_proxy):
    gate = asyncio.Event()
    _a, b, proxy, holder = await gpu_full_and_cloud_rate_limited(make_upstream, make_proxy, gate)

    waiting = asyncio.create_task(proxy.client.post(CHAT, json=chat()))
    await asyncio.sleep(0.2)
    assert b.calls == 1  # not called while the GPU's place may free any moment
    gate.set()
    await (await holder).read()
    resp = await waiting

    assert (resp.status, resp.headers["X-Mana-LLM-Resolved"]) == (200, "gpu/m1")
    assert b.calls == 1


async def test_a_rate_limited_entry_is_tried_once_the_wait_for_a_place_is_over(make_upstream, make_proxy):
    gate = asyncio.Event()
    _a, b, proxy, holder = await gpu_full_and_cloud_rate_limited(make_upstream, make_proxy, gate)
    started = time.monotonic()

    resp = await proxy.client.post(CHAT, json=chat())

    assert (resp.status, resp.headers["X-Mana-LLM-Resolved"]) == (200, "cloud/m2")  # as its direct call would
    assert time.monotonic() - started >= 0.5  # after the GPU's first-byte timeout, not before the wait
    assert b.calls == 2
    gate.set()
    await (await holder).read()
