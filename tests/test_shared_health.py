"""Breaker news across processes (`health: {shared: true}`): two real `manaproxy serve` processes and a real
`redis-server`. What one process finds (a dead provider, its recovery) the other acts on without paying for it;
Redis gone, each goes on with its own health; news never makes a request fail that local health would serve."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from manaproxy.health.news import DOWN, UP, Message, News, encode, upstream_digest
from manaproxy.sharedhealth import CHANNEL, SHARED_HEALTH

from .fakes import FakeUpstream, chat_answer, drop_connection, status_reply, wait_for
from .helpers import build_config, chat
from .processes import RedisServer, ServeProcess, post_to

RESOLVED = "X-Mana-LLM-Resolved"


@dataclass
class Pair:
    dead: FakeUpstream  # provider d: the one that goes down
    spare: FakeUpstream  # provider u: the fallback
    a: ServeProcess
    b: ServeProcess
    redis: RedisServer
    session: aiohttp.ClientSession


def shared_config(dead: FakeUpstream, spare: FakeUpstream, redis: RedisServer) -> str:
    """mana/x = [d/m1, u/m1], mana/solo = [d/m1]; breakers open after 2 failures; probes only for recovery
    (the interval is long); health news through `redis`."""
    aliases = {"mana/x": ["d/m1", "u/m1"], "mana/solo": ["d/m1"]}
    health = {"failure_threshold": 2, "backoff_seconds": 60, "probe_interval_seconds": 300, "shared": True}
    raw: dict[str, Any] = yaml.safe_load(build_config({"d": dead, "u": spare}, aliases, health=health))
    raw["redis"] = {"url": redis.url, "timeout_seconds": 0.5}  # generous: a loaded machine passes
    return yaml.safe_dump(raw, sort_keys=False)


async def sample(pair: Pair, process: ServeProcess, name: str, **labels: str) -> float | None:
    """The value of one sample of the process's `/metrics`, or None when it has none."""
    async with pair.session.get(process.url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


def listening(line: str) -> bool:
    return "health news: listening" in line


@pytest.fixture
async def pair(
    make_upstream: Callable[..., Awaitable[FakeUpstream]],
    serve: Callable[..., Awaitable[ServeProcess]],
    redis_server: RedisServer,
) -> AsyncIterator[Pair]:
    dead, spare = await make_upstream("d"), await make_upstream("u")
    dead.default, spare.default = chat_answer("m1"), chat_answer("m1")
    config = shared_config(dead, spare, redis_server)
    a = await serve(config)
    b = await serve(config)
    for process in (a, b):
        await process.wait_line(listening)
    async with aiohttp.ClientSession() as session:
        yield Pair(dead, spare, a, b, redis_server, session)


async def kill_provider(pair: Pair) -> None:
    """d drops every connection and fails its probes; A pays the 2 failures that open its breaker."""
    pair.dead.default = drop_connection()
    pair.dead.models_status = 503
    for _ in range(2):
        resp = await post_to(pair.session, pair.a.url, "mana/x")
        assert resp.status == 200
        assert resp.headers[RESOLVED] == "u/m1"
    await pair.a.wait_line(lambda line: "provider d unhealthy after 2 consecutive failures" in line)


async def test_a_provider_one_process_found_dead_is_skipped_by_the_other_at_once(pair):
    await kill_provider(pair)
    await pair.b.wait_line(lambda line: "provider d unhealthy per news from instance" in line)
    calls = pair.dead.calls
    resp = await post_to(pair.session, pair.b.url, "mana/x")
    assert resp.status == 200
    assert resp.headers[RESOLVED] == "u/m1"
    assert pair.dead.calls == calls  # B paid no failure of its own: it never called d
    assert await sample(pair, pair.b, "mana_llm_health_news_total", direction="heard", event="down") == 1
    assert await sample(pair, pair.b, "mana_llm_provider_healthy", provider="d") == 0
    assert await sample(pair, pair.a, "mana_llm_health_news_total", direction="sent", event="down") == 1


async def test_after_the_first_successful_probe_both_use_the_provider_again(pair):
    await kill_provider(pair)
    await pair.b.wait_line(lambda line: "provider d unhealthy per news" in line)
    pair.dead.default = chat_answer("m1")
    pair.dead.models_status = 200
    for process in (pair.a, pair.b):  # a probe of its own or the other's news, whichever came first
        await process.wait_line(lambda line: "provider d recovered" in line, timeout=5)
    for process in (pair.a, pair.b):
        resp = await post_to(pair.session, process.url, "mana/x")
        assert resp.status == 200
        assert resp.headers[RESOLVED] == "d/m1"


async def test_news_never_fails_a_request_that_local_health_would_serve(pair):
    # d fails A's two requests, then answers again; B hears it is down, but a chain of d alone is still
    # tried, as B's own health (no failure seen) would have it: the news only moves d to the end of a chain.
    pair.dead.queue(drop_connection(), drop_connection())
    pair.dead.models_status = 503
    for _ in range(2):
        assert (await post_to(pair.session, pair.a.url, "mana/x")).headers[RESOLVED] == "u/m1"
    await pair.b.wait_line(lambda line: "provider d unhealthy per news" in line)
    resp = await post_to(pair.session, pair.b.url, "mana/solo")
    assert resp.status == 200
    assert resp.headers[RESOLVED] == "d/m1"
    # ... and in a longer chain it is skipped while another entry answers
    assert (await post_to(pair.session, pair.b.url, "mana/x")).headers[RESOLVED] in ("u/m1", "d/m1")


async def test_without_redis_each_process_goes_on_with_its_own_health(pair):
    pair.redis.kill()
    for process in (pair.a, pair.b):  # the subscription breaks: the one WARNING of the outage
        await process.wait_line(lambda line: "is unreachable" in line)
    await kill_provider(pair)
    calls = pair.dead.calls
    resp = await post_to(pair.session, pair.b.url, "mana/x")
    assert resp.status == 200
    assert resp.headers[RESOLVED] == "u/m1"
    assert pair.dead.calls == calls + 1  # B heard nothing: it found d down itself
    for process in (pair.a, pair.b):
        assert len(process.lines_with("is unreachable")) == 1
        assert not process.lines_with("per news")
        errors = await sample(pair, process, "mana_llm_redis_errors_total", feature="health")
        assert errors is not None
        assert errors >= 1
    # Redis back: news flows again
    pair.redis.start()
    for process in (pair.a, pair.b):
        await process.wait_line(lambda line: " is back after " in line)
        await wait_for(lambda process=process: len(process.lines_with("health news: listening")) == 2)


# -- in one process: where news puts an entry in its chain -------------------------------------------------

ORIGIN = "0123456789abcdef"


async def test_an_entry_kept_out_by_news_alone_is_tried_after_the_rest_and_before_a_rate_limit(
    make_upstream, make_proxy
):
    limited, heard, failing = await make_upstream("r"), await make_upstream("d"), await make_upstream("x")
    limited.default = heard.default = chat_answer("m1")
    failing.default = status_reply(500)
    aliases = {"mana/x": ["r/m1", "d/m1", "x/m1"], "mana/two": ["d/m1", "x/m1"]}
    proxy = await make_proxy(build_config({"r": limited, "d": heard, "x": failing}, aliases))
    health = proxy.gateway.health
    health.rate_limited("r", 30.0, "HTTP 429")
    assert health.apply_news(News(DOWN, "d", seconds=60.0), ORIGIN)

    resp = await proxy.client.post("/v1/chat/completions", json=chat("mana/x"))
    assert resp.status == 200
    assert resp.headers[RESOLVED] == "d/m1"  # x failed; then d (news only), before r (rate-limited)
    assert (limited.calls, heard.calls, failing.calls) == (0, 1, 1)
    # d answered: news is over for it here, and it is used first again
    resp = await proxy.client.post("/v1/chat/completions", json=chat("mana/two"))
    assert resp.headers[RESOLVED] == "d/m1"
    assert failing.calls == 1


async def test_an_entry_kept_out_by_news_is_skipped_while_another_answers(make_upstream, make_proxy):
    heard, spare = await make_upstream("d"), await make_upstream("u")
    heard.default = spare.default = chat_answer("m1")
    proxy = await make_proxy(build_config({"d": heard, "u": spare}, {"mana/x": ["d/m1", "u/m1"]}))
    proxy.gateway.health.apply_news(News(DOWN, "d", seconds=60.0), ORIGIN)
    resp = await proxy.client.post("/v1/chat/completions", json=chat("mana/x"))
    assert resp.headers[RESOLVED] == "u/m1"
    assert heard.calls == 0


async def test_only_news_of_another_instance_about_the_same_upstream_is_applied(
    make_upstream, make_proxy, redis_server
):
    import redis.asyncio as aioredis

    heard, spare = await make_upstream("d"), await make_upstream("u")
    proxy = await make_proxy(shared_config(heard, spare, redis_server))
    shared = proxy.app[SHARED_HEALTH]
    health = proxy.gateway.health
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:
        await until_true(lambda: publisher.publish(CHANNEL, b"hello"), 5.0)  # garbage: ignored, subscribed
        digest = upstream_digest(proxy.config.providers["d"])
        for message in (
            Message(News(DOWN, "d", seconds=60.0), shared.instance, digest),  # our own: no echo
            Message(News(DOWN, "d", seconds=60.0), ORIGIN, "0" * 16),  # d is another server there
            Message(News(DOWN, "nope", seconds=60.0), ORIGIN, digest),  # a provider we do not have
            Message(News(UP, "d"), ORIGIN, digest),  # nothing news opened here to close
        ):
            await publisher.publish(CHANNEL, encode(message))
        await publisher.publish(CHANNEL, encode(Message(News(DOWN, "d", "m1", "embeddings", 9.0), ORIGIN, digest)))
        await wait_for(lambda: health.skip_reason(proxy.config.providers["d"], "m1", "embeddings") is not None)
        assert health.status("d") == "healthy"  # only the order of its own were applied: the model's breaker
        assert shared.heard == {"down": 1}
    finally:
        await publisher.aclose()


async def until_true(check, timeout: float) -> None:
    """Await `check()` until it is true (a publish: until someone listens)."""
    async with asyncio.timeout(timeout):
        for _ in range(100_000):
            if await check():
                return
            await asyncio.sleep(0.01)


async def test_a_reload_that_changes_health_shared_says_it_waits_for_a_restart(
    make_upstream, make_proxy, redis_server, tmp_path, caplog
):
    heard, spare = await make_upstream("d"), await make_upstream("u")
    text = shared_config(heard, spare, redis_server)
    proxy = await make_proxy(text)
    caplog.set_level(logging.WARNING, logger="manaproxy.reload")
    assert proxy.reload_to(tmp_path, text.replace("shared: true", "shared: false"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "manaproxy.reload"]
    assert warnings == ["health.shared changed: it takes effect at the next restart"]


async def test_a_process_that_starts_during_an_outage_knows_of_it_at_once(pair, serve):
    await kill_provider(pair)
    await pair.b.wait_line(lambda line: "provider d unhealthy per news" in line)
    late = await serve(pair.a.config_path.read_text())
    await late.wait_line(lambda line: "provider d unhealthy per news from instance" in line)
    calls = pair.dead.calls
    resp = await post_to(pair.session, late.url, "mana/x")
    assert resp.headers[RESOLVED] == "u/m1"
    assert pair.dead.calls == calls


async def test_a_rate_limit_one_process_was_given_is_kept_by_the_other(pair):
    pair.dead.queue(status_reply(429, "slow down", headers={"Retry-After": "30"}))
    resp = await post_to(pair.session, pair.a.url, "mana/x")
    assert resp.headers[RESOLVED] == "u/m1"
    await wait_for(lambda: pair.dead.calls == 1)

    async def heard_rate_limit() -> bool:
        return await sample(pair, pair.b, "mana_llm_health_news_total", direction="heard", event="rate_limited") == 1

    await until_true(heard_rate_limit, 5.0)
    resp = await post_to(pair.session, pair.b.url, "mana/x")
    assert resp.headers[RESOLVED] == "u/m1"
    assert pair.dead.calls == 1  # B never asked d: it knew d's window from A
