"""Reloading the config (SIGHUP, or `Reloader.reload` as SIGHUP's task calls it): a good file is swapped in
whole, a bad one never replaces the good one, requests in flight finish on the config they started with,
and whatever was built for the old config (health, model lists, connections) follows the new one."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from .fakes import (
    after,
    chat_chunks,
    chat_completion,
    gated_stream,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import CHAT, DONE, FAST_PROBES, ask, build_config, chat, probe_tasks


async def test_a_stream_in_flight_keeps_its_provider_across_a_reload_that_removes_it(
    make_upstream, make_proxy, tmp_path
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    gate = asyncio.Event()
    a.default = gated_stream(gate)
    b.default = sse_reply(chat_chunks("m2", ["new"]))
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert await resp.content.readline()
    assert proxy.reload_to(tmp_path, build_config({"b": b}, {"mana/x": ["b/m2"]}))
    gate.set()
    body = await resp.read()

    assert body.endswith(DONE)
    models = {orjson.loads(line[6:])["model"] for line in body.splitlines() if line.startswith(b"data: {")}
    assert models == {"a/m1"}
    assert proxy.gateway.health.get("a").in_flight == 0
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    await resp.read()


async def test_models_cache_follows_a_reload_to_the_new_upstream(make_upstream, make_proxy, tmp_path):
    old = await make_upstream("old")
    new = await make_upstream("new")
    old.models = ["stale"]
    new.models = ["fresh"]
    proxy = await make_proxy(build_config({"a": old}, {"mana/x": ["a/m1"]}))

    before = await (await proxy.client.get("/v1/models")).json()
    assert proxy.reload_to(tmp_path, build_config({"a": new}, {"mana/x": ["a/m1"]}))
    after = await (await proxy.client.get("/v1/models")).json()

    assert "a/stale" in {item["id"] for item in before["data"]}
    assert {item["id"] for item in after["data"]} == {"mana/x", "a/fresh"}


# -- health across a reload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "repointing",
    [
        pytest.param([{"a": "new", "b": "b"}], id="pointed-elsewhere"),
        pytest.param([{"b": "b"}, {"a": "new", "b": "b"}], id="removed-then-re-added-elsewhere"),
    ],
)
async def test_a_request_to_the_old_upstream_cannot_open_the_breaker_of_the_new_one(
    make_upstream, make_proxy, tmp_path, repointing
):
    fakes = {name: await make_upstream(name) for name in ("old", "new", "b")}
    gate = asyncio.Event()
    fakes["old"].default = after(gate, status_reply(503))
    fakes["new"].default = json_reply(chat_completion("m1"))
    fakes["b"].default = json_reply(chat_completion("m2"))
    settings = {"failure_threshold": 1, "backoff_seconds": 60}

    def config(providers: dict[str, str]) -> str:
        chain = [target for target in ("a/m1", "b/m2") if target[0] in providers]
        return build_config({name: fakes[fake] for name, fake in providers.items()}, {"mana/x": chain}, health=settings)

    proxy = await make_proxy(config({"a": "old", "b": "b"}))
    in_flight = asyncio.create_task(ask(proxy))
    await wait_for(lambda: fakes["old"].calls == 1)
    # The operator's fix for a failing provider: point it elsewhere (at once, or after taking it out) and reload.
    assert proxy.reload_to(tmp_path, config(repointing[0]))
    gate.set()
    assert await in_flight == "b/m2"  # the old upstream failed; the request fell back on its old chain
    for providers in repointing[1:]:
        assert proxy.reload_to(tmp_path, config(providers))

    assert await ask(proxy) == "a/m1"  # the new upstream has a clean slate and answers


# -- probes across a reload ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["removed", "repointed"])
async def test_a_probe_answered_after_a_reload_changed_its_provider_is_not_recorded(
    make_upstream, make_proxy, tmp_path, caplog, change
):
    slow = await make_upstream("slow")
    other = await make_upstream("other")
    slow.models_delay = 5.0  # the probe of `a` times out after the reload
    proxy = await make_proxy(build_config({"a": slow, "b": other}, health=FAST_PROBES), probes=True)
    await wait_for(lambda: slow.models_calls == 1)

    providers = {"b": other} if change == "removed" else {"a": other, "b": other}
    assert proxy.reload_to(tmp_path, build_config(providers, health={**FAST_PROBES, "probe_interval_seconds": 60}))
    await wait_for(lambda: all(task.get_name() != "manaproxy-probe-a" for task in probe_tasks()), timeout=2)

    health = proxy.gateway.health
    assert "provider a unhealthy" not in caplog.text
    if change == "removed":
        assert health.names() == ["b"]
    else:
        assert (health.breaker("a"), health.get("a").breaker.last_error) == ("closed", None)
