"""Active probes against real servers on loopback: dead and recovered providers, hanging probes,
no tokens spent, the first round at startup, and every provider in `/v1/health` from the start."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from .fakes import chat_completion, json_reply, status_reply, wait_for
from .helpers import FAST_PROBES, build_config, chat, probe_tasks
from .processes import free_port

FAST = {"probe_interval_seconds": 0.05, "probe_timeout_seconds": 0.3, "failure_threshold": 2, "backoff_seconds": 0.2}


async def provider_view(proxy, name: str):
    resp = await proxy.client.get("/v1/health")
    assert resp.status == 200
    return (await resp.json())["providers"][name]


async def test_a_probe_marks_a_dead_provider_unhealthy_with_no_traffic(make_upstream, make_proxy):
    live = await make_upstream("live")
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    proxy = await make_proxy(
        build_config({"dead": dead_url, "live": live}, {"mana/x": ["dead/m1", "live/m2"]}, health=FAST), probes=True
    )
    health = proxy.gateway.health
    await wait_for(lambda: health.status("dead") == "unhealthy", timeout=2)

    dead = await provider_view(proxy, "dead")
    assert dead["status"] == "unhealthy"
    assert dead["consecutive_failures"] >= 2
    assert dead["last_error"].startswith("probe: cannot connect to 127.0.0.1:")
    assert dead["unhealthy_until_unix"] > time.time()
    (alias,) = (await (await proxy.client.get("/v1/aliases")).json())["aliases"]
    assert (alias["entries"][0]["reason"], alias["serving"]) == ("unhealthy", "live/m2")

    await wait_for(lambda: live.models_calls >= 3, timeout=2)
    assert (await provider_view(proxy, "live"))["status"] == "healthy"
    assert live.requests == []  # probes only GET /v1/models: no POST, no tokens


async def test_a_recovered_provider_is_marked_healthy_again(make_proxy):
    port = free_port()
    proxy = await make_proxy(
        build_config({"p": f"http://127.0.0.1:{port}/v1"}, {"mana/x": ["p/m"]}, health=FAST), probes=True
    )
    health = proxy.gateway.health
    await wait_for(lambda: health.status("p") == "unhealthy", timeout=2)

    # The provider comes back on the same port.
    posts = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def anything_else(request: web.Request) -> web.Response:
        posts.append(request.path)
        return web.json_response({}, status=500)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", anything_else)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await wait_for(lambda: health.status("p") == "healthy", timeout=2)
        view = await provider_view(proxy, "p")
        assert (view["status"], view["breaker"], view["consecutive_failures"]) == ("healthy", "closed", 0)
        assert view["unhealthy_until_unix"] is None
        assert posts == []
    finally:
        await runner.cleanup()


async def test_a_hanging_probe_does_not_delay_the_others(make_upstream, make_proxy):
    slow = await make_upstream("slow")
    fast = await make_upstream("fast")
    slow.models_delay = 5.0  # answers long after the probe timeout
    health_settings = {**FAST, "failure_threshold": 1, "probe_timeout_seconds": 0.8}
    proxy = await make_proxy(build_config({"slow": slow, "fast": fast}, health=health_settings), probes=True)
    health = proxy.gateway.health

    await wait_for(lambda: fast.models_calls >= 1)
    first_check = health.get("fast").breaker.last_check
    # Several rounds of the fast provider go by while the slow one's first probe is still hanging.
    await wait_for(lambda: fast.models_calls >= 4, timeout=0.6)
    assert health.get("fast").breaker.last_check > first_check
    assert health.get("slow").breaker.last_check is None
    assert slow.models_calls == 1  # no second probe piles onto the hanging one

    await wait_for(lambda: health.status("slow") == "unhealthy", timeout=2)
    assert health.get("slow").breaker.last_error == "probe: timed out after 0.8s"
    assert health.status("fast") == "healthy"


async def test_the_first_probe_runs_at_startup_and_every_provider_is_listed_at_once(make_upstream, make_proxy):
    up = await make_upstream("up")
    hanging = await make_upstream("hanging")
    nokey = await make_upstream("nokey")
    hanging.models_delay = 5.0
    config = build_config(
        {"up": up, "hanging": hanging, "nokey": {"base_url": nokey, "api_key": "${NOKEY_API_KEY}"}},
        {"mana/x": ["nokey/m", "hanging/m", "up/m"]},
        health={"probe_interval_seconds": 60, "probe_timeout_seconds": 10},
    )
    proxy = await make_proxy(config, probes=True)

    # From the first moment: every configured provider is there, even before any probe answered.
    detail = await (await proxy.client.get("/v1/health")).json()
    assert set(detail["providers"]) == {"up", "hanging", "nokey"}
    assert detail["providers"]["hanging"]["last_check_unix"] is None
    assert detail["providers"]["nokey"]["status"] == "unconfigured"
    liveness = await (await proxy.client.get("/health")).json()
    assert set(liveness["providers"]) == {"up", "hanging"}

    # The first round started right away, not after the 60 s interval.
    await wait_for(lambda: up.models_calls == 1, timeout=1)
    await wait_for(lambda: proxy.gateway.health.get("up").breaker.last_check is not None, timeout=1)
    assert hanging.models_calls == 1
    assert nokey.models_calls == 0  # an unconfigured provider is never called
    assert up.requests == hanging.requests == nokey.requests == []


async def test_a_configured_probe_path_is_used_and_is_a_get(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.default = json_reply({"status": "ok"})
    config = build_config({"up": {"base_url": up, "probe": "/ping"}}, health=FAST)
    proxy = await make_proxy(config, probes=True)
    await wait_for(lambda: len(up.requests) >= 2, timeout=2)
    assert {(r.method, r.path, r.body) for r in up.requests} == {("GET", "/v1/ping", b"")}
    assert up.models_calls == 0
    assert proxy.gateway.health.status("up") == "healthy"


async def test_a_recovery_probe_closes_the_breaker_long_before_the_window_ends(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.models_status = 403  # our key refused: the provider's breaker, the one probes decide
    b.default = json_reply(chat_completion("m2"))
    settings = {**FAST, "probe_interval_seconds": 60, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=settings), probes=True)
    health = proxy.gateway.health
    await wait_for(lambda: health.breaker("a") == "open", timeout=2)  # the first round: out at once
    opened = time.monotonic()
    resp = await proxy.client.post("/v1/chat/completions", json=chat())
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    a.models_status = 200

    await wait_for(lambda: health.breaker("a") == "closed", timeout=3)  # the first recovery probe, ~1 s on

    assert 0.7 < time.monotonic() - opened < 3
    assert a.calls == 0  # skipped meanwhile; no real request was needed


async def test_a_probe_that_raises_marks_its_provider_unhealthy_and_probing_goes_on(
    make_upstream, make_proxy, faulty_kind
):
    """A bug in a provider's probe is that provider failing its check, never the end of the probe loop."""
    live = await make_upstream("live")
    providers = {"f": {"kind": faulty_kind, "base_url": "http://127.0.0.1:9/v1", "probe": "/raises"}, "live": live}
    proxy = await make_proxy(build_config(providers, health=FAST_PROBES), probes=True)
    health = proxy.gateway.health
    faulty = proxy.gateway.runtime.providers["f"]

    await wait_for(lambda: health.status("f") == "unhealthy", timeout=2)
    assert health.get("f").breaker.last_error == "probe: RuntimeError"

    calls = (faulty.probes, live.models_calls)
    await wait_for(lambda: faulty.probes > calls[0] and live.models_calls > calls[1], timeout=2)
    assert health.status("live") == "healthy"


# -- shutdown ------------------------------------------------------------------------------------------------


async def test_probes_stop_when_the_app_is_cleaned_up(make_upstream, make_proxy):
    slow = await make_upstream("slow")
    fast = await make_upstream("fast")
    slow.models_delay = 5.0
    proxy = await make_proxy(build_config({"slow": slow, "fast": fast}, health=FAST_PROBES), probes=True)
    await wait_for(lambda: fast.models_calls >= 2 and slow.models_calls == 1)
    assert probe_tasks()

    await proxy.client.close()  # the app's cleanup: the probe loop and the hanging probe are cancelled
    assert probe_tasks() == []
    calls = fast.models_calls
    await asyncio.sleep(0.2)  # four probe intervals
    assert fast.models_calls == calls


async def test_a_401_about_our_key_takes_the_provider_out_once_the_probe_confirms_it(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    b.default = json_reply(chat_completion("m2"))
    settings = {"probe_interval_seconds": 60, "probe_timeout_seconds": 1, "backoff_seconds": 60}
    aliases = {"mana/x": ["a/m1", "b/m2"], "mana/y": ["a/m9", "b/m2"]}
    proxy = await make_proxy(build_config({"a": a, "b": b}, aliases, health=settings), probes=True)
    health = proxy.gateway.health
    await wait_for(lambda: health.get("a").breaker.last_check is not None, timeout=2)  # the startup round passed
    a.default = status_reply(401, "invalid api key")  # the key is revoked: requests and probe alike refused
    a.models_status = 401

    resp = await proxy.client.post("/v1/chat/completions", json=chat())
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    await wait_for(lambda: health.breaker("a") == "open", timeout=2)  # the credential check it asked for

    resp = await proxy.client.post("/v1/chat/completions", json=chat("mana/y"))
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    assert a.calls == 1  # every model of a is skipped now
    assert health.get("a").breaker.last_error == "probe: HTTP 401: models failed"
