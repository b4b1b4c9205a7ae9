"""redislimits.py: the Lua script against `limits.gcra` (the same verdicts to the last bit, the same stored
state) with a real `redis-server`; its keys, their expiry, Redis's clock, a flushed script cache."""

from __future__ import annotations

import pytest

from manaproxy.config import ClientSpec
from manaproxy.limits import REQUESTS, TOKENS, Rule, gcra, rules_of
from manaproxy.redislimits import redis_gcra, redis_keys

RPM2 = Rule("requests_per_minute", REQUESTS, 2, 60.0)
TPM20 = Rule("tokens_per_minute", TOKENS, 20, 60.0)
RPM7_TPM1000_TPD50000 = rules_of(ClientSpec("c", requests_per_minute=7, tokens_per_minute=1000, tokens_per_day=50000))
# (seconds to advance, requests, tokens): admissions (requests=1) and answers' tokens counted after (requests=0)
STEPS = [(0, 1, 0), (0, 1, 0), (0.25, 1, 0), (0, 0, 13), (29.9999, 1, 0), (0.0001, 1, 0), (0, 0, 700), (0.5, 1, 0)]
STEPS += [(3, 0, 900), (1.1, 1, 0), (60, 1, 0), (0, 1, 0), (0, 2, 0), (8.57, 1, 0), (600, 0, 49_000), (61, 1, 0)]


@pytest.fixture
async def redis_client(redis_server):
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("rules", [(RPM2,), (TPM20,), (RPM2, TPM20), RPM7_TPM1000_TPD50000], ids=repr)
async def test_the_redis_script_gives_gcras_verdicts_to_the_last_bit(redis_client, rules):
    tats = [0.0] * len(rules)
    now = 1_765_000_000.123456  # an epoch-sized clock: the script's doubles must keep the microseconds
    for advance, requests, tokens in STEPS:
        now += advance
        tats, expected = gcra(tats, rules, now, requests=requests, tokens=tokens)
        got = await redis_gcra(redis_client, "app-1", rules, requests=requests, tokens=tokens, now=now)
        assert got == expected, (advance, requests, tokens)
        stored = [await redis_client.get(key) for key in redis_keys("app-1", rules)]
        assert [float(value) if value is not None else 0.0 for value in stored] == tats


async def test_the_redis_windows_expire_when_idle_and_name_the_client_not_its_key(redis_client):
    rules = rules_of(ClientSpec("bot", keys=("sk-secret-key",), requests_per_minute=2, tokens_per_day=86400))
    await redis_gcra(redis_client, "bot", rules, requests=1, tokens=0)  # Redis's own clock
    await redis_gcra(redis_client, "bot", rules[1:], requests=0, tokens=10)
    keys = sorted(key.decode() for key in await redis_client.keys("*"))
    assert keys == ["manaproxy:limits:v1:{bot}:requests_per_minute", "manaproxy:limits:v1:{bot}:tokens_per_day"]
    # Each key lives as long as its window is not whole: 30 s for one request of 2 a minute, 10 s for 10 tokens
    # of 86400 a day.
    assert 29_000 < await redis_client.pttl(keys[0]) <= 30_000
    assert 9_000 < await redis_client.pttl(keys[1]) <= 10_000


async def test_the_redis_script_uses_redis_time_and_survives_a_script_flush(redis_client):
    (rule,) = rules = (RPM2,)
    assert (await redis_gcra(redis_client, "a", rules, requests=1, tokens=0)).allowed
    await redis_client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT, EVAL loads it again
    assert (await redis_gcra(redis_client, "a", rules, requests=1, tokens=0)).allowed
    refused = await redis_gcra(redis_client, "a", rules, requests=1, tokens=0)
    assert not refused.allowed
    assert 29.0 < refused.windows[0].retry_after <= 30.0  # Redis's clock moved by milliseconds between the calls
    assert refused.windows[0].rule is rule
