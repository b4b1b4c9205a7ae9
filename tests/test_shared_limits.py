"""Client limits kept in Redis (`limits: {backend: redis}`, issue 19), end to end with a real `redis-server`: one
limit shared by two `manaproxy serve` processes, requests and tokens alike; Redis killed mid-run (requests go on,
or are refused with 503 under `on_backend_error: closed`), and limits enforced again once it is back."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
import yaml

from .fakes import chat_answer, wait_for
from .helpers import CHAT, build_config, chat, value
from .processes import RedisServer

pytestmark = pytest.mark.timeout(30)

KEY = "sk-telegram-bot-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def shared_config(up: Any, redis: RedisServer, limits: dict[str, Any], **settings: Any) -> str:
    """Provider a, alias mana/x, the client `bot` with `limits`, its windows in `redis`."""
    text = build_config({"a": up}, {"mana/x": ["a/m1"]})
    extra = {
        "clients": {"bot": {"key": KEY, **limits}},
        "redis": {"url": redis.url, "timeout_seconds": 0.5},
        "limits": {"backend": "redis", **settings},
    }
    return text + yaml.safe_dump(extra, sort_keys=False)


async def ask(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with session.post(base + CHAT, json=chat("mana/x"), headers=AUTH) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_a_limit_is_shared_by_two_processes(make_upstream, serve, redis_server):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    config = shared_config(up, redis_server, {"requests_per_minute": 4})
    first, second = await asyncio.gather(serve(config), serve(config))

    async with aiohttp.ClientSession() as session:
        answers = [await ask(session, process.url) for process in (first, second) * 3]

    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 200, 429, 429]  # 4 a minute between them, not 4 each
    assert [headers["x-ratelimit-remaining-requests"] for _, headers, _ in answers] == ["3", "2", "1", "0", "0", "0"]
    _, refused, body = answers[5]  # refused by the second process, which let in only two
    assert refused["x-ratelimit-limit-requests"] == "4"
    assert 1 <= int(refused["Retry-After"]) <= 15  # one request's worth comes back every 15 s
    assert (body["error"]["type"], body["error"]["code"]) == ("requests", "rate_limit_exceeded")
    assert up.calls == 4


async def test_tokens_are_counted_across_processes(make_upstream, serve, redis_server):
    import redis.asyncio as aioredis

    up = await make_upstream("up")
    up.default = chat_answer("m1", usage=(9, 4))  # 13 tokens an answer
    config = shared_config(up, redis_server, {"tokens_per_minute": 20})
    first, second = await asyncio.gather(serve(config), serve(config))
    store = aioredis.Redis.from_url(redis_server.url)
    window = "manaproxy:limits:v1:{bot}:tokens_per_minute"

    async def counted(before: bytes | None) -> bytes:
        """The window's tat once an answer's tokens moved it (counted in the background, after the answer)."""
        async with asyncio.timeout(5):
            while True:
                now = await store.get(window)
                if now != before:
                    assert isinstance(now, bytes)
                    return now
                await asyncio.sleep(0.01)

    try:
        async with aiohttp.ClientSession() as session:
            status, headers, _ = await ask(session, first.url)
            assert (status, headers["x-ratelimit-remaining-tokens"]) == (200, "20")  # counted after the answer
            tat = await counted(None)
            status, headers, _ = await ask(session, second.url)
            assert (status, headers["x-ratelimit-remaining-tokens"]) == (200, "7")  # the second process sees them
            await counted(tat)
            status, headers, body = await ask(session, first.url)
    finally:
        await store.aclose()
    assert status == 429  # 26 of 20 spent, between the two processes
    assert body["error"]["type"] == "tokens"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert up.calls == 2


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_killed_mid_run_then_back(make_upstream, make_proxy, redis_server, caplog, policy):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    proxy = await make_proxy(shared_config(up, redis_server, {"requests_per_minute": 2}, on_backend_error=policy))
    caplog.set_level(logging.INFO, logger="manaproxy.limits")

    async def post() -> aiohttp.ClientResponse:
        resp = await proxy.client.post(CHAT, json=chat("mana/x"), headers=AUTH)
        await resp.read()
        return resp

    assert [(await post()).status for _ in range(3)] == [200, 200, 429]
    redis_server.kill()
    during = [await post() for _ in range(4)]
    if policy == "open":
        assert [resp.status for resp in during] == [200] * 4  # let in, unchecked
        assert all("x-ratelimit-remaining-requests" not in resp.headers for resp in during)
    else:
        assert [resp.status for resp in during] == [503] * 4
        assert (await during[0].json())["error"]["code"] == "limits_unavailable"
        assert during[0].headers["Retry-After"] == "1"
    assert value(proxy, "mana_llm_client_limit_errors_total") == 4
    assert value(proxy, "mana_llm_redis_errors_total", feature="limits") == 4
    warnings = [r for r in caplog.records if r.name == "manaproxy.limits" and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per outage
    assert ("let in" if policy == "open" else "refused") in warnings[0].getMessage()

    redis_server.start()  # a restart: empty, so the client's minute starts afresh
    await wait_for(lambda: proxy.gateway.redis.up, timeout=5)
    assert [(await post()).status for _ in range(3)] == [200, 200, 429]
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == "manaproxy.limits")
    assert up.calls == 2 + 2 + (4 if policy == "open" else 0)


async def test_a_reload_moves_the_windows_to_redis_and_back(make_upstream, make_proxy, redis_server, tmp_path):
    import redis.asyncio as aioredis

    up = await make_upstream("up")
    up.default = chat_answer("m1")
    memory = shared_config(up, redis_server, {"requests_per_minute": 2}).replace("backend: redis", "backend: memory")
    proxy = await make_proxy(memory)

    async def status() -> int:
        resp = await proxy.client.post(CHAT, json=chat("mana/x"), headers=AUTH)
        await resp.read()
        return resp.status

    assert [await status() for _ in range(3)] == [200, 200, 429]  # this process's own minute
    assert proxy.reload_to(tmp_path, shared_config(up, redis_server, {"requests_per_minute": 2}))
    assert [await status() for _ in range(3)] == [200, 200, 429]  # Redis's minute, empty until now
    store = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await store.exists("manaproxy:limits:v1:{bot}:requests_per_minute")
    finally:
        await store.aclose()
    assert proxy.reload_to(tmp_path, memory)
    assert await status() == 429  # the memory windows were kept meanwhile
