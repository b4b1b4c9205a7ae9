"""Reloading the config: a good file is swapped in whole, a bad one never replaces the good one nor stops the
process, requests in flight finish on the config they started with, and what was built for the old config
(health, model lists, probes, providers, metrics) follows the new one.

In-process tests reload as SIGHUP's task does (`Reloader.reload`, via `Proxy.reload_to`); the last ones send
SIGHUP to a real `manaproxy serve`. (`HealthTracker.reconfigure` itself is tested in test_tracker.py.)
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from manaproxy.probe import probe_one

from .fakes import (
    GEMINI_MODEL,
    Recorded,
    after,
    chat_chunks,
    chat_completion,
    gated_stream,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import (
    CHAT,
    DONE,
    FAST_PROBES,
    FIELDS,
    MANA_LLM_ALIASES,
    ask,
    build_config,
    chat,
    exists,
    google_spec,
    parse_logfmt,
    post_chat,
    probe_tasks,
    two_entry_proxy,
    value,
)
from .processes import post_to

# -- the swap --------------------------------------------------------------------------------------------------


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


async def test_reload_counts_results_and_resyncs_provider_health(make_upstream, make_proxy, tmp_path):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    good = tmp_path / "good.yaml"
    good.write_text(build_config({"b": b, "c": a}, {"mana/y": ["c/m3", "b/m2"]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [not, a, mapping]\n")

    assert proxy.reloader.reload(str(good))
    assert not proxy.reloader.reload(str(bad))
    assert not proxy.reloader.reload(str(tmp_path / "missing.yaml"))

    assert value(proxy, "mana_llm_config_reloads_total", result="success") == 1
    assert value(proxy, "mana_llm_config_reloads_total", result="failure") == 2
    assert not exists(proxy, "mana_llm_provider_healthy", provider="a")
    assert value(proxy, "mana_llm_provider_healthy", provider="c") == 1
    await post_chat(proxy, chat("mana/y"))
    assert value(proxy, "mana_llm_alias_resolved_total", alias="mana/y", target="c/m3") == 1
    assert value(proxy, "mana_llm_llm_requests_total", provider="c", model="m3", streaming="false") == 1


# -- health across a reload ------------------------------------------------------------------------------


async def test_a_reload_keeps_the_health_of_unchanged_providers_and_resets_repointed_ones(
    make_upstream, make_proxy, tmp_path
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    c = await make_upstream("c")
    a.default = status_reply(401, "invalid key")
    a.models_status = 401
    b.default = json_reply(chat_completion("m2"))
    health = {"failure_threshold": 2, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health))
    providers = proxy.gateway.runtime.providers
    await probe_one(proxy.gateway, providers["a"], 1.0)  # a's key refused: its breaker opens
    assert await ask(proxy) == "b/m2"
    b.models_status = 503
    await probe_one(proxy.gateway, providers["b"], 1.0)  # and b has one failure
    tracker = proxy.gateway.health
    assert (tracker.breaker("a"), tracker.get("b").breaker.consecutive_failures) == ("open", 1)

    assert proxy.reload_to(
        tmp_path, build_config({"a": a, "b": b, "c": c}, {"mana/x": ["a/m1", "c/m3"]}, health=health)
    )
    assert tracker.breaker("a") == "open"  # same upstream: its outage is still known
    assert tracker.get("b").breaker.consecutive_failures == 1
    assert (await (await proxy.client.get("/v1/health")).json())["providers"]["c"]["status"] == "healthy"

    # Pointing a elsewhere (the operator's fix for an outage) gives it a clean slate at once.
    assert proxy.reload_to(
        tmp_path, build_config({"a": c, "b": b, "c": c}, {"mana/x": ["a/m1", "c/m3"]}, health=health)
    )
    assert tracker.breaker("a") == "closed"
    assert await ask(proxy) == "a/m1"
    assert c.requests[-1].json["model"] == "m1"


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


# -- what follows the new config ---------------------------------------------------------------------------


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


async def test_a_reload_probes_new_providers_at_once(make_upstream, make_proxy, tmp_path):
    a = await make_upstream("a")
    c = await make_upstream("c")
    config = {"probe_interval_seconds": 60, "probe_timeout_seconds": 1}
    proxy = await make_proxy(build_config({"a": a}, health=config), probes=True)
    await wait_for(lambda: a.models_calls == 1, timeout=1)

    assert proxy.reload_to(tmp_path, build_config({"a": a, "c": c}, health=config))
    await wait_for(lambda: c.models_calls == 1, timeout=1)
    await wait_for(lambda: proxy.gateway.health.get("c").breaker.last_check is not None, timeout=1)


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


async def test_a_reload_lets_the_old_google_provider_go_and_keeps_the_session(make_google_proxy, gemini, tmp_path):
    text = build_config({"google": google_spec(gemini)}, {"mana/g": [f"google/{GEMINI_MODEL}"]})
    proxy = await make_google_proxy(text)
    assert await ask(proxy, chat("mana/g")) == f"google/{GEMINI_MODEL}"
    old = weakref.ref(proxy.gateway.runtime.providers["google"])

    assert proxy.reload_to(tmp_path, text)

    # Nothing holds on to the dropped provider and its SDK client once it is closed (no request was in flight).
    await wait_for(lambda: gc.collect() >= 0 and old() is None, timeout=2)
    assert proxy.gateway.session is not None
    assert not proxy.gateway.session.closed  # the application's session outlives every provider on it
    assert await ask(proxy, chat("mana/g", stream=True)) == f"google/{GEMINI_MODEL}"


# -- SIGHUP to `manaproxy serve` ---------------------------------------------------------------------------


async def test_sighup_adds_an_alias_and_each_request_is_logged(make_upstream, serve):
    down = await make_upstream("down")
    up = await make_upstream("up")
    down.default = status_reply(503)
    up.default = sse_reply(chat_chunks("m1", ["Hel", "lo"], usage=(3, 2)))
    proxy = await serve(build_config({"down": down, "up": up}, {"mana/a": ["down/m0", "up/m1"]}))

    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            proxy.url + CHAT,
            json=chat("mana/a", stream=True),
            headers={"X-Request-ID": "req-process-1"},
        )
        body = await resp.read()
        assert resp.status == 200
        assert body.endswith(b"data: [DONE]\n\n")
        assert (await post_to(session, proxy.url, "mana/b")).status == 404

        await proxy.reload(build_config({"down": down, "up": up}, {"mana/a": ["up/m1"], "mana/b": ["up/m2"]}))
        up.default = json_reply(chat_completion("m2"))
        resp = await post_to(session, proxy.url, "mana/b")
        assert resp.status == 200
        assert resp.headers["X-Mana-LLM-Resolved"] == "up/m2"
    assert up.requests[-1].json["model"] == "m2"
    assert len(proxy.lines_with("reloaded ")) == 1

    line = await proxy.wait_line(lambda text: "request_id=req-process-1 " in text)
    fields = parse_logfmt(line[line.index("request_id=") :])
    assert list(fields) == FIELDS
    assert fields["model"] == "mana/a"
    assert fields["resolved"] == "up/m1"
    assert fields["attempts"] == "down/m0:http_503"
    assert (fields["status"], fields["stream"], fields["outcome"]) == ("200", "true", "completed")
    assert float(fields["ttfb_ms"]) <= float(fields["duration_ms"])
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == ("3", "2")


@pytest.mark.parametrize(
    ("bad_config", "reason"),
    [
        pytest.param("providers: [unclosed\naliases: {}\n", "line 2", id="broken-yaml"),
        pytest.param(None, "names undeclared provider 'nope'", id="unknown-provider"),
    ],
)
async def test_a_bad_reload_keeps_the_old_config_and_the_process(make_upstream, serve, bad_config, reason):
    up = await make_upstream("up")
    good = build_config({"up": up}, {"mana/a": ["up/m1"]})
    proxy = await serve(good)
    if bad_config is None:
        bad_config = build_config({"up": up}, {"mana/a": ["up/m1"], "mana/b": ["nope/m9"]})

    await proxy.reload(bad_config)
    (rejected,) = proxy.lines_with("reload rejected")
    assert "ERROR" in rejected
    assert "keeping the previous config" in rejected
    assert str(proxy.config_path) in rejected
    assert reason in rejected
    assert proxy.proc is not None
    assert proxy.proc.returncode is None

    async with aiohttp.ClientSession() as session:
        resp = await post_to(session, proxy.url, "mana/a")
        assert resp.status == 200
        assert resp.headers["X-Mana-LLM-Resolved"] == "up/m1"
        assert (await post_to(session, proxy.url, "mana/b")).status == 404
        aliases = await (await session.get(proxy.url + "/v1/aliases")).json()
        assert [alias["name"] for alias in aliases["aliases"]] == ["mana/a"]

    # Fixing the file and reloading again works: the process is fully alive.
    await proxy.reload(build_config({"up": up}, {"mana/a": ["up/m1"], "mana/b": ["up/m2"]}))
    async with aiohttp.ClientSession() as session:
        assert (await post_to(session, proxy.url, "mana/b")).status == 200


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(make_upstream, serve):
    a = await make_upstream("a")
    b = await make_upstream("b")
    c = await make_upstream("c")
    gate = asyncio.Event()

    async def held_then_503(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        await gate.wait()
        return await status_reply(503)(request, recorded)

    a.default = held_then_503
    b.default = json_reply(chat_completion("m2"))
    c.default = json_reply(chat_completion("m3"))
    proxy = await serve(build_config({"a": a, "b": b, "c": c}, {"mana/x": ["a/m1", "b/m2"]}))

    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(post_to(session, proxy.url, "mana/x"))
        await wait_for(lambda: len(a.requests) == 1)
        await proxy.reload(build_config({"a": a, "b": b, "c": c}, {"mana/x": ["a/m1", "c/m3"]}))
        gate.set()
        resp = await in_flight
        assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"  # the old chain's fallback, not the new one's
        resp = await post_to(session, proxy.url, "mana/x")
        assert resp.headers["X-Mana-LLM-Resolved"] == "c/m3"
    assert b.calls == 1


async def test_a_key_added_by_a_reload_is_redacted_when_an_upstream_echoes_it(make_upstream, make_proxy, tmp_path):
    a = await make_upstream("a")
    new_key = "test-reloaded-key-98765"  # no key shape: only the redactor's knowledge of it hides it

    async def echo_key(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return web.json_response({"error": {"message": f"key {key} was rejected"}}, status=400)

    a.default = echo_key
    proxy = await make_proxy(
        build_config({"a": {"base_url": a, "api_key": "test-first-key-0000"}}, {"mana/x": ["a/m1"]})
    )
    config = build_config({"a": {"base_url": a, "api_key": new_key}}, {"mana/x": ["a/m1"]})
    assert proxy.reload_to(tmp_path, config)

    resp = await proxy.client.post(CHAT, json=chat())
    body = await resp.text()

    assert a.requests[-1].headers["Authorization"] == f"Bearer {new_key}"  # the new key was sent ...
    assert resp.status == 400
    assert new_key not in body  # ... and its echo is not relayed
    assert "key [redacted] was rejected" in body


async def test_a_reload_builds_the_built_in_providers_from_the_environment_then(make_proxy, tmp_path, monkeypatch):
    """Built-in providers are made at each load: a reload reads the process environment as it is then."""
    text = MANA_LLM_ALIASES
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    proxy = await make_proxy(text, env={})
    assert not proxy.gateway.config.providers["groq"].configured

    monkeypatch.setenv("GROQ_API_KEY", "test-key-after-reload")
    monkeypatch.setenv("TOGETHER_API_KEY", "test-key-together-reload")
    assert proxy.reload_to(tmp_path, text)
    providers = proxy.gateway.config.providers
    assert providers["groq"].configured
    assert providers["groq"].builtin
    assert providers["together"].configured  # present now: its key is set
    health = await (await proxy.client.get("/v1/health")).json()
    assert health["providers"]["groq"]["configured"] is True
    assert "test-key-after-reload" not in str(health)


@pytest.mark.parametrize(
    ("place", "section"),
    [
        ("limits.backend", {"limits": {"backend": "redis", "on_backend_error": "closed"}}),
        ("cache.backend", {"cache": {"backend": "redis"}}),
        ("health.shared", {"health": {"shared": True}}),
    ],
)
async def test_a_reload_that_needs_a_redis_link_never_opened_is_refused(
    make_upstream, make_proxy, redis_server, tmp_path, place, section
):
    """The link is opened at start from `redis:`: a feature turned on by a reload without one could never work
    (limits would refuse every request with `closed`, the cache answer `error`), so the old config stays."""
    up = await make_upstream("a")
    up.default = json_reply(chat_completion("m1"))
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))
    before = proxy.gateway.config
    raw = yaml.safe_load(build_config({"a": up}, {"mana/x": {"chain": ["a/m1"], "cache": True}}))
    raw.update({"redis": {"url": redis_server.url}, **section})
    if place == "limits.backend":
        raw["clients"] = {"web": {"keys": ["sk-web-123456789"], "requests_per_minute": 2}}

    assert not proxy.reload_to(tmp_path, yaml.safe_dump(raw))
    assert proxy.gateway.config is before
    outcome = proxy.reloader.recent[-1]
    assert outcome.result == "failure"
    assert f"{place}: needs redis.url at start; restart to enable" in (outcome.error or "")
    resp = await proxy.client.post(CHAT, json=chat())
    assert resp.status == 200
    assert "X-Mana-LLM-Cache" not in resp.headers  # the old config: mana/x did not cache
