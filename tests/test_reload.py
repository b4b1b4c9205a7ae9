"""Reloading the config (SIGHUP, or `Reloader.reload` as SIGHUP's task calls it): a good file is swapped in
whole, a bad one never replaces the good one, requests in flight finish on the config they started with,
and whatever was built for the old config (health, model lists, connections) follows the new one."""

from __future__ import annotations

import asyncio

import orjson

from .fakes import chat_chunks, gated_stream, sse_reply
from .helpers import CHAT, DONE, build_config, chat


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
