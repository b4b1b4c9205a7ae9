"""The circuit breaker end to end: open after N failures, skip without calling, half-open recovery,
what `/health`, `/v1/health` and `/v1/aliases` show meanwhile; plus the state machine on a fake clock."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from manaproxy.config import HealthSettings, ProviderConfig, parse_config
from manaproxy.health import HealthTracker

from .conftest import build_config
from .fakes import chat_completion, json_reply, status_reply, wait_for

BREAKER = {"failure_threshold": 2, "backoff_seconds": 0.3}
CHAT = {"model": "mana/x", "messages": [{"role": "user", "content": "hi"}]}


async def breaker_proxy(make_upstream, make_proxy):
    """Alias mana/x = [a/m1, b/m2]; a fails with 503, b answers."""
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(503, "model overloaded")
    b.default = json_reply(chat_completion("m2"))
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=BREAKER))
    return a, b, proxy


async def ask(proxy) -> str:
    resp = await proxy.client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200, await resp.text()
    await resp.read()
    return resp.headers["X-Mana-LLM-Resolved"]


async def get_json(proxy, path: str):
    resp = await proxy.client.get(path)
    assert resp.status == 200
    return await resp.json()


async def open_breaker(proxy, a) -> None:
    assert await ask(proxy) == "b/m2"
    assert await ask(proxy) == "b/m2"
    assert a.calls == 2
    assert proxy.gateway.health.breaker("a") == "open"


async def test_breaker_opens_after_threshold_and_skips_without_calling(make_upstream, make_proxy):
    a, b, proxy = await breaker_proxy(make_upstream, make_proxy)

    assert await ask(proxy) == "b/m2"
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]
    assert (detail["status"], detail["consecutive_failures"], detail["breaker"]) == ("healthy", 1, "closed")

    assert await ask(proxy) == "b/m2"  # second consecutive failure: the breaker opens
    assert await ask(proxy) == "b/m2"
    assert await ask(proxy) == "b/m2"
    assert a.calls == 2  # skipped without being called
    assert b.calls == 4

    opened = time.time()
    health = await get_json(proxy, "/v1/health")
    detail = health["providers"]["a"]
    assert health["status"] == "degraded"
    assert detail["status"] == "unhealthy"
    assert detail["breaker"] == "open"
    assert detail["consecutive_failures"] == 2
    assert detail["last_error"] == "HTTP 503: model overloaded"
    assert opened - 0.05 < detail["unhealthy_until_unix"] <= opened + 0.3
    assert detail["last_check_unix"] <= opened
    assert health["providers"]["b"]["status"] == "healthy"
    assert health["providers"]["b"]["last_latency_seconds"] is not None

    liveness = await get_json(proxy, "/health")
    assert liveness == {"status": "degraded", "providers": {"a": "unhealthy", "b": "healthy"}}

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
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]
    assert detail["last_error"].startswith("HTTP 503: bad key [redacted] or [redacted], details: xxx")
    assert len(detail["last_error"]) <= 200
    assert "test-key" not in str(detail)
    assert "sk-proj" not in str(detail)


async def test_after_the_backoff_a_success_closes_the_breaker(make_upstream, make_proxy):
    a, _, proxy = await breaker_proxy(make_upstream, make_proxy)
    await open_breaker(proxy, a)
    health = proxy.gateway.health
    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)

    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]
    assert (detail["status"], detail["breaker"], detail["unhealthy_until_unix"]) == ("unhealthy", "half_open", None)
    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert alias["serving"] == "a/m1"  # half-open: the next request would try it

    a.default = json_reply(chat_completion("m1"))
    assert await ask(proxy) == "a/m1"
    assert a.calls == 3
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]
    assert (detail["status"], detail["breaker"], detail["consecutive_failures"]) == ("healthy", "closed", 0)
    assert detail["unhealthy_until_unix"] is None
    assert (await get_json(proxy, "/health"))["status"] == "healthy"


async def test_a_failure_when_half_open_reopens_at_once(make_upstream, make_proxy):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    await open_breaker(proxy, a)
    health = proxy.gateway.health
    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)

    reopened = time.time()
    assert await ask(proxy) == "b/m2"  # the trial went to a, failed, and fell back
    assert a.calls == 3
    assert health.breaker("a") == "open"  # one failure re-opened it, not failure_threshold of them
    assert await ask(proxy) == "b/m2"
    assert a.calls == 3
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]
    assert detail["consecutive_failures"] == 3
    assert reopened < detail["unhealthy_until_unix"] <= time.time() + 0.3


async def test_half_open_sends_one_trial_at_a_time(make_upstream, make_proxy):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    await open_breaker(proxy, a)
    health = proxy.gateway.health
    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)

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
    assert health.breaker("a") == "closed"
    assert await ask(proxy) == "a/m1"


async def test_429_with_retry_after_keeps_the_provider_out_without_counting_an_outage(make_upstream, make_proxy):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    a.default = status_reply(429, "slow down", headers={"Retry-After": "5"})
    assert await ask(proxy) == "b/m2"
    assert await ask(proxy) == "b/m2"
    assert a.calls == 1  # kept out for Retry-After
    detail = (await get_json(proxy, "/v1/health"))["providers"]["a"]
    assert (detail["status"], detail["breaker"], detail["consecutive_failures"]) == ("rate_limited", "closed", 0)
    assert time.time() + 4 < detail["unhealthy_until_unix"] <= time.time() + 5
    (alias,) = (await get_json(proxy, "/v1/aliases"))["aliases"]
    assert (alias["entries"][0]["reason"], alias["serving"]) == ("rate_limited", "b/m2")


async def test_a_listener_that_raises_cannot_break_the_state_machine(make_upstream, make_proxy, caplog):
    a, _b, proxy = await breaker_proxy(make_upstream, make_proxy)
    heard: list[tuple[str, bool]] = []

    def broken(provider: str, healthy: bool) -> None:
        raise RuntimeError("listener bug")

    health = proxy.gateway.health
    health.add_listener(broken)
    health.add_listener(lambda provider, healthy: heard.append((provider, healthy)))
    caplog.set_level(logging.WARNING, logger="manaproxy.health")

    await open_breaker(proxy, a)
    assert heard == [("a", False)]  # the listener after the broken one still heard
    assert "listener" in caplog.text
    assert "RuntimeError: listener bug" in caplog.text
    assert "provider a unhealthy after 2 consecutive failures" in caplog.text

    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)
    a.default = json_reply(chat_completion("m1"))
    assert await ask(proxy) == "a/m1"
    assert heard == [("a", False), ("a", True)]
    assert health.breaker("a") == "closed"
    assert "provider a recovered" in caplog.text


async def test_reload_keeps_health_of_unchanged_providers_and_resets_changed_ones(make_upstream, make_proxy, tmp_path):
    a, b, proxy = await breaker_proxy(make_upstream, make_proxy)
    c = await make_upstream("c")
    await open_breaker(proxy, a)
    b.default = status_reply(500)
    await proxy.client.post("/v1/chat/completions", json={"model": "b/m2", "messages": []})
    gateway = proxy.gateway
    assert gateway.health.get("b").breaker.consecutive_failures == 1

    path = tmp_path / "aliases.yaml"
    path.write_text(build_config({"a": a, "b": b, "c": c}, {"mana/x": ["a/m1", "c/m3"]}, health=BREAKER))
    assert proxy.reloader.reload(str(path))
    assert gateway.health.breaker("a") == "open"  # same upstream: its outage is still known
    assert gateway.health.get("b").breaker.consecutive_failures == 1
    assert (await get_json(proxy, "/v1/health"))["providers"]["c"]["status"] == "healthy"

    # Pointing a elsewhere (the operator's fix for an outage) gives it a clean slate at once.
    path.write_text(build_config({"a": c, "b": b, "c": c}, {"mana/x": ["a/m1", "c/m3"]}, health=BREAKER))
    assert proxy.reloader.reload(str(path))
    assert gateway.health.breaker("a") == "closed"
    assert await ask(proxy) == "a/m1"
    assert c.requests[-1].json["model"] == "m1"


# -- the state machine on a fake clock --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(threshold: int = 2, backoff: float = 10.0) -> tuple[HealthTracker, FakeClock, ProviderConfig]:
    clock = FakeClock()
    settings = HealthSettings(failure_threshold=threshold, backoff_seconds=backoff)
    config = parse_config(build_config({"p": "http://127.0.0.1:9/v1"}), env={})
    health = HealthTracker(settings, config.providers, clock=clock, wall_clock=lambda: 5000.0)
    return health, clock, config.providers["p"]


def test_a_success_resets_the_failure_count():
    health, _, spec = tracker(threshold=2)
    health.failed("p", "boom")
    health.succeeded("p", 0.1)
    health.failed("p", "boom")
    assert health.breaker("p") == "closed"
    assert health.skip_reason(spec) is None


def test_a_probe_success_closes_an_open_breaker():
    health, clock, spec = tracker(threshold=1, backoff=10)
    health.failed("p", "boom")
    assert (health.breaker("p"), health.skip_reason(spec)) == ("open", "unhealthy")
    assert health.unavailable_until("p") == 5000.0 + 10  # wall time of the window's end
    clock.now += 1
    health.succeeded("p", probe=True)
    assert (health.breaker("p"), health.skip_reason(spec), health.status("p")) == ("closed", None, "healthy")


def test_recovery_probes_come_at_a_growing_interval_while_the_provider_stays_down():
    health, clock, _ = tracker(threshold=1, backoff=10)
    health.failed("p", "boom")
    due = []
    for _ in range(60):  # 30 s of checking every half second
        clock.now += 0.5
        if health.recovery_probes()[0]:
            due.append(clock.now - 1000.0)
            health.failed("p", "probe: connect refused", probe=True)
    # 1 s after opening, then 2, 4, 8 s apart, then every backoff (10 s); half-open re-opens on failure.
    assert due[:5] == [1.0, 3.0, 7.0, 15.0, 25.0]


def test_a_provider_that_probes_well_but_fails_requests_is_retried_less_and_less():
    """/models answering while completions fail: each close by a probe doubles the next first probe delay."""
    health, clock, _ = tracker(threshold=1, backoff=60)
    delays = []
    for _ in range(5):
        health.failed("p", "HTTP 500")  # a request fails: open
        opened = clock.now
        while not health.recovery_probes()[0]:
            clock.now += 0.25
        delays.append(clock.now - opened)
        health.succeeded("p", probe=True)  # /models answers: closed again
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    health.succeeded("p", 0.1)  # a real request succeeds: the next outage starts at 1 s again
    health.failed("p", "HTTP 500")
    assert health.get("p").breaker.probe_at == clock.now + 1.0


def test_failures_inside_the_window_do_not_stretch_it_and_a_half_open_failure_rearms_it():
    health, clock, spec = tracker(threshold=1, backoff=10)
    health.failed("p", "boom")
    clock.now += 9
    health.failed("p", "probe: timed out after 3s")
    clock.now += 1
    assert health.breaker("p") == "half_open"
    health.failed("p", "still down")
    assert health.breaker("p") == "open"
    clock.now += 9.9
    assert health.skip_reason(spec) == "unhealthy"
    clock.now += 0.1
    assert health.skip_reason(spec) is None
    assert health.get("p").breaker.last_error == "still down"


def test_a_real_success_closes_even_an_open_breaker():
    """A request that started before the breaker opened and then succeeded is proof enough."""
    health, _, _ = tracker(threshold=1)
    health.failed("p", "boom")
    health.succeeded("p", 0.2)
    assert health.breaker("p") == "closed"
    assert health.get("p").last_latency == 0.2


def test_repr_names_the_state():
    health, _, _ = tracker(threshold=1)
    health.failed("p", "boom")
    assert repr(health.get("p")) == "<ProviderHealth p unhealthy failures=1 in_flight=0 last_error='boom'>"


def test_redaction_does_not_mangle_text_around_short_keys():
    config = parse_config(build_config({"p": {"base_url": "http://127.0.0.1:9/v1", "api_key": "y"}}), env={})
    health = HealthTracker(config.health, config.providers)
    health.failed("p", "timed out   before the\nfirst byte (Bearer abcdefgh12345)")
    assert health.get("p").breaker.last_error == "timed out before the first byte ([redacted])"
