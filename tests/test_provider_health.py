"""Provider health end to end: a breaker opens after N failures and its entry is skipped without a call, a
half-open trial lets it back in, a 429 keeps it out for Retry-After; health is scoped to what failed (a
model's HTTP errors to that model, transport failures to the provider); and what `/health`, `/v1/health`
and `/v1/aliases` show meanwhile. (The state machine on a fake clock: test_tracker.py.)"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from manaproxy import __version__
from manaproxy.probe import probe_one

from .fakes import (
    chat_chunks,
    chat_completion,
    closed_port_url,
    gated_stream,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import CHAT, ask, build_config, chat, two_entry_proxy

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
    proxy = await make_proxy(build_config({"g": g, "b": b}, aliases, health=BREAKER))
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
