"""Provider health end to end: a breaker opens after N failures and its entry is skipped without a call, a
half-open trial lets it back in, a 429 keeps it out for Retry-After; health is scoped to what failed (a
model's HTTP errors to that model, transport failures to the provider); and what `/health`, `/v1/health`
and `/v1/aliases` show meanwhile. Active probes against real servers on loopback: dead and recovered
providers, hanging probes, no tokens spent, the first round at startup, every provider in `/v1/health` from the
start. And a provider that restarts for a second under the real `manaproxy serve`: used again within seconds,
not after `backoff_seconds`, the requests refused meanwhile counted, not logged one WARNING each.
(The state machine on a fake clock: test_tracker.py.)"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from aiohttp import web

from manaproxy import __version__
from manaproxy.probe import probe_one

from .fakes import (
    Restarting,
    chat_answer,
    chat_chunks,
    chat_completion,
    closed_port_url,
    gated_stream,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import CHAT, FAST_PROBES, ask, build_config, chat, probe_tasks, two_entry_proxy
from .processes import free_port

BREAKER = {"failure_threshold": 2, "backoff_seconds": 0.3}


async def breaker_proxy(make_upstream, make_proxy):
    """Alias mana/x = [a/m1, b/m2]; a fails with 503, b answers."""
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(503, "model overloaded")
    b.default = json_reply(chat_completion("m2"))
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=BREAKER))
    return a, b, proxy


async def get_json(proxy, path: str):
    resp = await proxy.client.get(path)
    assert resp.status == 200
    return await resp.json()


async def open_breaker(proxy, a) -> None:
    assert await ask(proxy) == "b/m2"
    assert await ask(proxy) == "b/m2"
    assert a.calls == 2
    assert proxy.gateway.health.breaker("a", "m1") == "open"


async def half_open_proxy(make_upstream, make_proxy):
    """`breaker_proxy` once a's breaker has opened and its window is over: the next request is a trial."""
    a, b, proxy = await breaker_proxy(make_upstream, make_proxy)
    await open_breaker(proxy, a)
    await wait_for(lambda: proxy.gateway.health.breaker("a", "m1") == "half_open", timeout=2)
    return a, b, proxy


async def test_breaker_opens_after_threshold_and_skips_without_calling(make_upstream, make_proxy):
    a, b, proxy = await breaker_proxy(make_upstream, make_proxy)

    assert await ask(proxy) == "b/m2"
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert (detail["status"], detail["consecutive_failures"], detail["breaker"]) == ("healthy", 1, "closed")

    assert await ask(proxy) == "b/m2"  # second consecutive failure: the breaker opens
    assert await ask(proxy) == "b/m2"
    assert await ask(proxy) == "b/m2"
    assert a.calls == 2  # skipped without being called
    assert b.calls == 4

    opened = time.time()
    health = await get_json(proxy, "/v1/health")
    detail = health["providers"]["a"]["models"]["m1"]
    assert health["status"] == "healthy"  # the provider answers; one of its models does not
    assert health["providers"]["a"]["breaker"] == "closed"
    assert detail["status"] == "unhealthy"
    assert detail["breaker"] == "open"
    assert detail["consecutive_failures"] == 2
    assert detail["last_error"] == "HTTP 503: model overloaded"
    assert opened - 0.05 < detail["unhealthy_until_unix"] <= opened + 0.3
    assert detail["last_check_unix"] <= opened
    assert health["providers"]["b"]["status"] == "healthy"
    assert health["providers"]["b"]["last_latency_seconds"] is not None

    liveness = await get_json(proxy, "/health")
    assert liveness == {
        "status": "healthy",
        "service": "mana-llm",  # mana-llm's /health shape (issue 17)
        "version": __version__,
        "providers": {"a": "healthy", "b": "healthy"},
    }

    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    first, second = alias["entries"]
    assert alias["serving"] == "b/m2"
    assert (first["target"], first["available"], first["reason"]) == ("a/m1", False, "unhealthy")
    assert first["until_unix"] == pytest.approx(detail["unhealthy_until_unix"], abs=0.05)
    assert (second["target"], second["available"], second["reason"]) == ("b/m2", True, None)


async def test_the_aliases_view_says_when_a_kept_out_entry_is_really_tried_again(make_upstream, make_proxy):
    a, b = await make_upstream("a"), await make_upstream("b")
    a.default = status_reply(503, "model overloaded")
    b.default = chat_answer("m2")
    health = {"failure_threshold": 1, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health))
    assert await ask(proxy) == "b/m2"  # the breaker opens for 60 s; its first trial is 1 s away
    opened = time.time()

    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    first, second = alias["entries"]

    assert opened + 55 < first["until_unix"] <= opened + 60.5
    assert opened < first["retry_unix"] < opened + 5  # its first trial, a second after it opened
    assert "retry_unix" not in second


async def test_last_error_is_short_and_has_no_key(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    # The upstream echoes the key it got (and another key-shaped string) in a long error body.
    a.default = status_reply(503, "bad key test-key-0123456789 or sk-proj-fakefakefake123, details: " + "x" * 500)
    config = build_config(
        {"a": {"base_url": a, "api_key": "${A_KEY}"}, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=BREAKER
    )
    proxy = await make_proxy(config, env={"A_KEY": "test-key-0123456789"})
    await open_breaker(proxy, a)
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert detail["last_error"].startswith("HTTP 503: bad key [redacted] or [redacted], details: xxx")
    assert len(detail["last_error"]) <= 200
    assert "test-key" not in str(detail)
    assert "sk-proj" not in str(detail)


async def test_after_the_backoff_a_success_closes_the_breaker(make_upstream, make_proxy):
    a, _b, proxy = await half_open_proxy(make_upstream, make_proxy)

    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert (detail["status"], detail["breaker"], detail["unhealthy_until_unix"]) == ("unhealthy", "half_open", None)
    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert alias["serving"] == "a/m1"  # half-open: the next request would try it

    a.default = json_reply(chat_completion("m1"))
    assert await ask(proxy) == "a/m1"
    assert a.calls == 3
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert (detail["status"], detail["breaker"], detail["consecutive_failures"]) == ("healthy", "closed", 0)
    assert detail["unhealthy_until_unix"] is None


async def test_a_failure_when_half_open_reopens_at_once(make_upstream, make_proxy):
    a, _b, proxy = await half_open_proxy(make_upstream, make_proxy)
    health = proxy.gateway.health

    reopened = time.time()
    assert await ask(proxy) == "b/m2"  # the trial went to a, failed, and fell back
    assert a.calls == 3
    assert health.breaker("a", "m1") == "open"  # one failure re-opened it, not failure_threshold of them
    assert await ask(proxy) == "b/m2"
    assert a.calls == 3
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert detail["consecutive_failures"] == 3
    assert reopened < detail["unhealthy_until_unix"] <= time.time() + 0.3


async def test_half_open_sends_one_trial_at_a_time(make_upstream, make_proxy):
    a, _b, proxy = await half_open_proxy(make_upstream, make_proxy)
    health = proxy.gateway.health

    release = asyncio.Event()

    async def slow_success(request, recorded):
        await release.wait()
        return await json_reply(chat_completion("m1"))(request, recorded)

    a.default = slow_success
    trial = asyncio.create_task(ask(proxy))
    await wait_for(lambda: a.calls == 3)

    assert await ask(proxy) == "b/m2"  # another request does not pile onto the suspect provider
    assert a.calls == 3
    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert alias["entries"][0]["reason"] == "half_open"
    assert alias["serving"] == "b/m2"

    release.set()
    assert await trial == "a/m1"
    assert health.breaker("a", "m1") == "closed"
    assert await ask(proxy) == "a/m1"


async def test_half_open_trial_is_not_blocked_by_a_stream_from_before_the_breaker_opened(make_upstream, make_proxy):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    a.queue(sse_reply(chat_chunks("m1", ["still", "going"]), hang_after=2))
    long_stream = await proxy.client.post(CHAT, json=chat(stream=True))
    await long_stream.content.readline()
    for _ in range(2):  # two 503s open a's breaker while the stream from before still runs
        assert await ask(proxy) == "b/m2"
    await wait_for(lambda: proxy.gateway.health.breaker("a", "m1") == "half_open", timeout=2)
    a.default = json_reply(chat_completion("m1"))

    try:
        assert await ask(proxy) == "a/m1"  # the trial goes to a
    finally:
        long_stream.close()


async def test_a_trial_stream_outliving_a_reopened_breaker_does_not_block_the_next_trial(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(503)
    b.default = json_reply(chat_completion("m2"))
    health_settings = {"failure_threshold": 1, "backoff_seconds": 0.2}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health_settings))
    health = proxy.gateway.health

    assert await ask(proxy) == "b/m2"  # a fails once: open
    await wait_for(lambda: health.breaker("a", "m1") == "half_open", timeout=2)

    gate = asyncio.Event()
    a.queue(gated_stream(gate))
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"  # the trial: its first event closes the breaker
    await resp.content.readuntil(b"\n\n")
    assert health.breaker("a", "m1") == "closed"

    assert await ask(proxy) == "b/m2"  # a fails again while the trial stream still runs: open again
    await wait_for(lambda: health.breaker("a", "m1") == "half_open", timeout=2)
    a.default = json_reply(chat_completion("m1"))
    try:
        assert await ask(proxy) == "a/m1"  # the window is over: this request is the new trial
    finally:
        gate.set()
        await resp.read()


@pytest.mark.parametrize(
    ("failure", "last_error"),
    [
        pytest.param(
            lambda: sse_reply(chat_chunks("m1", ["a", "b", "c"]), cut_after=2),
            "upstream connection failed mid-stream",
            id="connection-cut",
        ),
        pytest.param(
            lambda: sse_reply(chat_chunks("m1", ["a", "b", "c"]), done=False),
            "upstream ended the stream without [DONE]",
            id="no-done",
        ),
    ],
)
async def test_a_stream_failing_after_the_commit_counts_against_the_model(
    make_upstream, make_proxy, failure, last_error
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = failure()
    proxy = await make_proxy(
        build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health={"failure_threshold": 1})
    )

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"  # committed: the failure is a's alone
    assert b"data: [DONE]" not in await resp.read()

    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert (detail["status"], detail["breaker"], detail["consecutive_failures"]) == ("unhealthy", "open", 1)
    assert detail["last_error"].startswith(last_error)
    assert await ask(proxy) == "b/m2"  # the next request skips a
    assert a.calls == 1


async def test_429_with_retry_after_keeps_the_model_out_without_counting_an_outage(make_upstream, make_proxy):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    a.default = status_reply(429, "slow down", headers={"Retry-After": "5"})
    assert await ask(proxy) == "b/m2"
    assert await ask(proxy) == "b/m2"
    assert a.calls == 1  # kept out for Retry-After
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]["models"]["m1"]
    assert (detail["status"], detail["breaker"], detail["consecutive_failures"]) == ("rate_limited", "closed", 0)
    assert time.time() + 4 < detail["unhealthy_until_unix"] <= time.time() + 5
    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert (alias["entries"][0]["reason"], alias["serving"]) == ("rate_limited", "b/m2")


async def test_a_listener_that_raises_cannot_break_the_state_machine(make_upstream, make_proxy, caplog):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    a.default = status_reply(401, "invalid api key")
    a.models_status = 401  # the probe too: our credentials, the provider's breaker
    heard: list[tuple[str, bool]] = []

    def broken(provider: str, healthy: bool) -> None:
        raise RuntimeError("listener bug")

    health = proxy.gateway.health
    health.add_listener(broken)
    health.add_listener(lambda provider, healthy: heard.append((provider, healthy)))
    caplog.set_level(logging.WARNING, logger="manaproxy.health")

    assert await ask(proxy) == "b/m2"
    await probe_one(proxy.gateway, proxy.gateway.runtime.providers["a"], 1.0)  # the credential check it asked for
    assert health.breaker("a") == "open"
    assert heard == [("a", False)]  # the listener after the broken one still heard
    assert "listener" in caplog.text
    assert "RuntimeError: listener bug" in caplog.text
    assert "provider a unhealthy after 1 consecutive failures" in caplog.text

    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)
    a.default = json_reply(chat_completion("m1"))
    assert await ask(proxy) == "a/m1"
    assert heard == [("a", False), ("a", True)]
    assert health.breaker("a") == "closed"
    assert "provider a recovered" in caplog.text


# -- liveness ----------------------------------------------------------------------------------------------


async def test_health_answers_200_with_json_status(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)

    resp = await proxy.client.get("/health")

    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert (await resp.json())["status"] == "healthy"
    assert a.calls == b.calls == 0  # a liveness check sends nothing upstream


async def test_health_stays_200_when_a_provider_is_down(make_upstream, make_proxy):
    b = await make_upstream("b")
    a = closed_port_url()  # nothing listens: connection refused, the provider's own breaker
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1"]}, health={"failure_threshold": 1}))
    await proxy.client.post(CHAT, json=chat())
    await wait_for(lambda: proxy.gateway.health.status("a") == "unhealthy")

    resp = await proxy.client.get("/health")

    # Liveness: the process answers; a provider outage shows in the status, not as a failed check.
    assert resp.status == 200
    assert await resp.json() == {
        "status": "degraded",
        "service": "mana-llm",
        "version": __version__,
        "providers": {"a": "unhealthy", "b": "healthy"},
    }


# -- scope: a model's failures are that model's, the provider's transport failures everyone's ------------


async def scoped_proxy(make_upstream, make_proxy):
    """Provider `g` (like Groq: limits and errors per model) serves mana/one = [g/m1, b/x] and
    mana/two = [g/m2, b/x]; `b` is the fallback."""
    g = await make_upstream("g")
    b = await make_upstream("b")
    b.default = json_reply(chat_completion("x"))
    aliases = {"mana/one": ["g/m1", "b/x"], "mana/two": ["g/m2", "b/x"]}
    # A window of 60 s: what is open stays open while the test looks, however slow the machine.
    proxy = await make_proxy(build_config({"g": g, "b": b}, aliases, health={**BREAKER, "backoff_seconds": 60}))
    return g, b, proxy


def by_model(answers: dict[str, object]):
    """A behavior answering per requested model."""

    async def behave(request, recorded):
        return await answers[recorded.json["model"]](request, recorded)

    return behave


async def test_a_429_on_one_model_leaves_the_providers_other_models_in_use(make_upstream, make_proxy):
    g, _b, proxy = await scoped_proxy(make_upstream, make_proxy)
    g.default = by_model(
        {
            "m1": status_reply(429, "rate limit for m1", headers={"Retry-After": "30"}),
            "m2": json_reply(chat_completion("m2")),
        }
    )

    assert await ask(proxy, chat("mana/one")) == "b/x"  # m1 is rate-limited ...
    assert await ask(proxy, chat("mana/two")) == "g/m2"  # ... m2 of the same provider is not
    assert await ask(proxy, chat("mana/one")) == "b/x"
    assert [request.json["model"] for request in g.requests] == ["m1", "m2"]  # m1 kept out for Retry-After
    (one, two) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert (one["entries"][0]["reason"], two["entries"][0]["available"]) == ("rate_limited", True)


async def test_a_broken_model_opens_its_own_breaker_not_the_providers(make_upstream, make_proxy):
    g, _b, proxy = await scoped_proxy(make_upstream, make_proxy)
    g.default = by_model({"m1": status_reply(500, "m1 is broken"), "m2": json_reply(chat_completion("m2"))})
    health = proxy.gateway.health

    for _ in range(3):
        assert await ask(proxy, chat("mana/one")) == "b/x"
    assert await ask(proxy, chat("mana/two")) == "g/m2"

    assert (health.breaker("g", "m1"), health.breaker("g", "m2"), health.breaker("g")) == ("open", "closed", "closed")
    view = (await get_json(proxy, "/v1/health"))["providers"]["g"]
    assert (view["status"], view["breaker"]) == ("healthy", "closed")
    assert (view["models"]["m1"]["status"], view["models"]["m1"]["last_error"]) == (
        "unhealthy",
        "HTTP 500: m1 is broken",
    )
    assert view["models"]["m2"]["status"] == "healthy"
    metrics = await (await proxy.client.get("/metrics")).text()
    assert 'mana_llm_provider_healthy{provider="g"} 1.0' in metrics
    assert 'mana_llm_target_healthy{target="g/m1"} 0.0' in metrics
    assert 'mana_llm_target_healthy{target="g/m2"} 1.0' in metrics
    assert 'mana_llm_alias_healthy_targets{alias="mana/one"} 1.0' in metrics


async def test_a_provider_that_cannot_be_reached_is_skipped_for_every_model(make_upstream, make_proxy):
    b = await make_upstream("b")
    b.default = json_reply(chat_completion("x"))
    aliases = {"mana/one": ["g/m1", "b/x"], "mana/two": ["g/m2", "b/x"]}
    proxy = await make_proxy(build_config({"g": closed_port_url(), "b": b}, aliases, health=BREAKER))

    assert await ask(proxy, chat("mana/one")) == "b/x"
    assert await ask(proxy, chat("mana/two")) == "b/x"  # connection refused twice: the provider's breaker opens

    (one, two) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert (one["entries"][0]["reason"], two["entries"][0]["reason"]) == ("unhealthy", "unhealthy")
    view = (await get_json(proxy, "/v1/health"))["providers"]["g"]
    assert (view["status"], view["breaker"]) == ("unhealthy", "open")
    assert view["last_error"].startswith("cannot connect to 127.0.0.1:")
    assert (await get_json(proxy, "/health"))["providers"]["g"] == "unhealthy"


# -- 401/403: our key, or only one model or request? A probe with our key decides ------------------------


async def test_a_burst_of_403s_for_one_model_leaves_the_providers_other_models_and_aliases_in_use(
    make_upstream, make_proxy
):
    """A client may name any `provider/model`: 403s it alone gets (a model the account may not use, a
    moderation refusal) are about its requests, not our key — the probe of g's models answers."""
    g, _b, proxy = await scoped_proxy_with_probes(make_upstream, make_proxy)
    g.default = by_model(
        {"forbidden-model": status_reply(403, "not allowed for this account"), "m2": json_reply(chat_completion("m2"))}
    )
    health = proxy.gateway.health

    for _ in range(3):  # a burst, well past failure_threshold
        replies = await asyncio.gather(*(proxy.client.post(CHAT, json=chat("g/forbidden-model")) for _ in range(8)))
        assert {reply.status for reply in replies} == {502}  # our key looks refused to this client: a bad gateway
        await asyncio.sleep(0.05)

    assert await ask(proxy, chat("mana/two")) == "g/m2"  # the alias on the same provider still uses it
    assert await ask(proxy, chat("g/m2")) == "g/m2"
    assert (health.breaker("g"), health.breaker("g", "forbidden-model")) == ("closed", "closed")
    view = (await get_json(proxy, "/v1/health"))["providers"]["g"]
    assert view["status"] == "healthy"
    assert view["models"]["forbidden-model"]["last_error"] == "HTTP 403: not allowed for this account"
    assert g.models_calls <= 3  # the startup round and credential checks, at most one per credential_check_seconds


async def scoped_proxy_with_probes(make_upstream, make_proxy):
    """`scoped_proxy` with the probe loop running (interval 60 s: only the startup round and the checks)."""
    g = await make_upstream("g")
    b = await make_upstream("b")
    b.default = json_reply(chat_completion("x"))
    aliases = {"mana/one": ["g/m1", "b/x"], "mana/two": ["g/m2", "b/x"]}
    settings = {**BREAKER, "probe_interval_seconds": 60, "probe_timeout_seconds": 1}
    proxy = await make_proxy(build_config({"g": g, "b": b}, aliases, health=settings), probes=True)
    await wait_for(lambda: proxy.gateway.health.get("g").breaker.last_check is not None, timeout=2)
    return g, b, proxy


# -- active probes: dead and recovered providers, hanging probes, the startup round, our key -----------------


FAST = {"probe_interval_seconds": 0.05, "probe_timeout_seconds": 1.0, "failure_threshold": 2, "backoff_seconds": 0.2}


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
    health_settings = {**FAST, "failure_threshold": 1, "probe_timeout_seconds": 2.0}
    proxy = await make_proxy(build_config({"slow": slow, "fast": fast}, health=health_settings), probes=True)
    health = proxy.gateway.health

    await wait_for(lambda: fast.models_calls >= 1)
    first_check = health.get("fast").breaker.last_check
    # Several rounds of the fast provider go by while the slow one's first probe is still hanging.
    await wait_for(lambda: fast.models_calls >= 4, timeout=1.5)
    assert health.get("fast").breaker.last_check > first_check
    assert health.get("slow").breaker.last_check is None
    assert slow.models_calls == 1  # no second probe piles onto the hanging one

    await wait_for(lambda: health.status("slow") == "unhealthy", timeout=4)
    assert health.get("slow").breaker.last_error == "probe: timed out after 2s"
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
    resp = await proxy.client.post("/v1/chat/completions", json=chat("a/m1"))  # a lone entry: no trial either
    assert resp.status == 503
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=unhealthy"
    assert a.calls == 1  # our key is known refused: sending it again could only be refused


async def test_a_lone_entry_s_failed_tries_do_not_push_back_the_trials_of_the_chains_that_have_a_fallback(
    make_upstream, make_proxy
):
    a, b = await make_upstream("a"), await make_upstream("b")
    a.default = status_reply(500, "model crashed")
    b.default = chat_answer("m2")
    health = {"failure_threshold": 1, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health))
    assert await ask(proxy) == "b/m2"  # the model's breaker opens; its first trial is a second away
    opened = time.time()

    for _ in range(6):  # an app calling the model directly retries, and each of its tries fails
        assert (await proxy.client.post(CHAT, json=chat("a/m1"))).status == 500

    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert alias["entries"][0]["retry_unix"] < opened + 5  # still its first trial, not 2, 4 … 64 s out
    assert a.calls == 1 + 6


# -- a provider restart on a real process: used again within seconds, refusals counted -----------------------


async def test_a_one_second_provider_restart_costs_seconds_not_the_backoff(serve):
    provider = Restarting("m1")
    await provider.start()
    health = {"failure_threshold": 2, "backoff_seconds": 60, "probe_interval_seconds": 30, "probe_timeout_seconds": 1}
    # A second entry that is down for good: with nothing to fall back to, the breaker's refusals show.
    providers = {"p": provider.base_url, "down": closed_port_url()}
    process = await serve(build_config(providers, {"mana/x": ["p/m1", "down/m1"]}, health=health))
    statuses: list[tuple[float, int]] = []

    async with aiohttp.ClientSession() as session:

        async def ask() -> None:
            async with session.post(process.url + CHAT, json=chat()) as resp:
                await resp.read()
                statuses.append((time.monotonic(), resp.status))

        await ask()
        await provider.stop()  # the provider goes away ...
        for _ in range(3):  # ... requests fail and open the breaker, the next are refused
            await ask()
        await asyncio.sleep(1.0)
        await provider.start()  # ... and is back one second later
        back = time.monotonic()
        try:
            while time.monotonic() - back < 10 and statuses[-1][1] != 200:
                await asyncio.sleep(0.1)
                await ask()
        finally:
            await provider.stop()

    assert [status for _, status in statuses[:4]] == [200, 503, 503, 503]
    answered_at, status = statuses[-1]
    assert status == 200
    assert answered_at - back < 4  # backoff_seconds is 60
    refused_by_breaker = [line for line in process.lines if "p/m1:unhealthy" in line]
    assert refused_by_breaker
    assert all(" INFO " in line for line in refused_by_breaker)
    assert len(process.lines_with("provider p unhealthy")) == 1
    assert process.lines_with("provider p recovered (a probe succeeded)")


async def test_a_lone_entry_whose_provider_restarts_answers_at_the_first_request_after_it_is_back(serve):
    provider = Restarting("m1")
    await provider.start()
    health = {"failure_threshold": 2, "backoff_seconds": 60, "probe_interval_seconds": 30, "probe_timeout_seconds": 1}
    # Its probes never pass (a path it does not serve): only a request can find it back, however slow this
    # machine is about the steps below.
    spec = {"base_url": provider.base_url, "probe": "/not-served"}
    process = await serve(build_config({"p": spec}, {"mana/x": ["p/m1"]}, health=health))

    async with aiohttp.ClientSession() as session:

        async def ask() -> int:
            async with session.post(process.url + CHAT, json=chat()) as resp:
                await resp.read()
                return resp.status

        await provider.stop()  # the provider goes away: the breaker opens ...
        assert [await ask() for _ in range(3)] == [503, 503, 503]
        await provider.start()  # ... and is back
        try:
            status = await ask()  # nothing else to try: this request is the trial, as a direct call would be
        finally:
            await provider.stop()

    assert status == 200
    assert process.lines_with("provider p unhealthy")
    await process.wait_line(lambda line: "provider p recovered (a request succeeded)" in line)  # not a probe
    assert not [line for line in process.lines if "p/m1:unhealthy" in line]  # each request reached it
