"""The response cache end to end (issue 18), every test run against both backends: the memory LRU and a real
`redis-server` of the test's own (`redis_server` fixture). Hits are compared byte for byte with the answer
they replay; the fake upstream numbers its answers, so a second upstream call can never pass for a hit."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
from pathlib import Path
from time import perf_counter
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import FormData, web

from manaproxy.body import OFF_LOOP_BYTES

from .fakes import (
    FakeUpstream,
    Recorded,
    chat_chunks,
    chat_completion,
    json_reply,
    responses_stream,
    sse_reply,
    status_reply,
    typed_events,
    wait_for,
)
from .helpers import CHAT, DONE, Proxy, build_config, chat, parse_logfmt, value
from .processes import RedisServer, free_port

pytestmark = pytest.mark.timeout(20)

CACHE = "X-Mana-LLM-Cache"
RESOLVED = "X-Mana-LLM-Resolved"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def redis_if_needed(backend: str, request: pytest.FixtureRequest) -> RedisServer | None:
    return request.getfixturevalue("redis_server") if backend == "redis" else None


def numbered(model: str = "m1") -> Any:
    """Chat answers as asked (SSE to `stream: true`), each with its own text: `answer 1`, `answer 2` ..."""
    counter = itertools.count(1)

    async def behave(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        text = f"answer {next(counter)}"
        if isinstance(recorded.json, dict) and recorded.json.get("stream") is True:
            return await sse_reply(chat_chunks(model, text.split()))(request, recorded)
        return await json_reply(chat_completion(model, text))(request, recorded)

    return behave


def cache_config(
    upstream: FakeUpstream,
    backend: str,
    redis: RedisServer | None,
    *,
    alias_cache: Any = True,
    chain: list[str] | None = None,
    cache: dict[str, Any] | None = None,
    timeout: float = 0.5,
) -> str:
    """mana/x = [a/m1] (cached as `alias_cache` says) and mana/plain = [a/m1] (not cached), the cache on
    `backend`. Redis commands get `timeout` seconds: generous, so that a loaded machine passes (the tests of a
    slow Redis set their own)."""
    aliases: dict[str, Any] = {
        "mana/x": {"chain": chain or ["a/m1"], "cache": alias_cache},
        "mana/plain": ["a/m1"],
    }
    raw = yaml.safe_load(build_config({"a": upstream}, aliases))
    raw["cache"] = {"backend": backend, **(cache or {})}
    if redis is not None:
        raw["redis"] = {"url": redis.url, "timeout_seconds": timeout}
    return yaml.safe_dump(raw, sort_keys=False)


@pytest.fixture
async def cached(make_upstream, make_proxy, backend, redis_if_needed) -> tuple[FakeUpstream, Proxy]:
    """mana/x caches on `backend`; the upstream numbers its answers. Returns (upstream, proxy)."""
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, backend, redis_if_needed))
    return up, proxy


async def post(proxy: Proxy, body: Any, *, headers: dict[str, str] | None = None, path: str = CHAT) -> Any:
    """Post, read the whole answer, and wait until its store (if any) is written; (response, body bytes)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await proxy.client.post(path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    raw = await resp.read()
    await proxy.gateway.cache.settle()
    return resp, raw


def cache_count(proxy: Proxy, result: str, alias: str = "mana/x") -> float:
    return value(proxy, "mana_llm_cache_requests_total", alias=alias, result=result)


# -- hits, misses, bypasses ------------------------------------------------------------------------------------


async def test_a_repeated_request_is_a_hit_byte_for_byte(cached):
    up, proxy = cached
    first, first_body = await post(proxy, chat())
    assert first.status == 200
    assert first.headers[CACHE] == "miss"
    assert "Age" not in first.headers

    second, second_body = await post(proxy, chat())
    assert second.status == 200
    assert second.headers[CACHE] == "hit"
    assert second_body == first_body  # the same bytes, `model` as answered
    assert orjson.loads(second_body)["choices"][0]["message"]["content"] == "answer 1"
    assert second.headers[RESOLVED] == first.headers[RESOLVED] == "a/m1"
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert int(second.headers["Age"]) >= 0
    assert up.calls == 1
    assert (cache_count(proxy, "miss"), cache_count(proxy, "hit")) == (1, 1)


async def test_a_streamed_hit_replays_the_same_events(cached):
    up, proxy = cached
    first, first_body = await post(proxy, chat(stream=True))
    assert first.headers[CACHE] == "miss"
    assert first_body.endswith(DONE)

    second, second_body = await post(proxy, chat(stream=True))
    assert second.headers[CACHE] == "hit"
    assert second.headers["Content-Type"] == "text/event-stream"
    assert second_body == first_body
    assert up.calls == 1


async def test_streamed_and_unstreamed_requests_never_share_an_entry(cached):
    up, proxy = cached
    await post(proxy, chat(stream=True))
    unstreamed, body = await post(proxy, chat(stream=False))
    assert unstreamed.headers[CACHE] == "miss"
    assert orjson.loads(body)["object"] == "chat.completion"
    streamed, body = await post(proxy, chat(stream=True))
    assert streamed.headers[CACHE] == "hit"
    assert body.startswith(b"data: ")
    assert up.calls == 2


async def test_key_order_and_whitespace_do_not_matter_but_number_spelling_does(cached):
    up, proxy = cached
    await post(proxy, b'{"model": "mana/x", "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}]}')
    resp, _ = await post(proxy, b'{"messages":[{"content":"hi","role":"user"}],"temperature":0.5,"model":"mana/x"}')
    assert resp.headers[CACHE] == "hit"
    resp, _ = await post(proxy, b'{"messages":[{"content":"hi","role":"user"}],"temperature":0.50,"model":"mana/x"}')
    assert resp.headers[CACHE] == "miss"
    assert up.calls == 2


async def test_no_cache_skips_the_lookup_but_stores_and_no_store_does_neither(cached):
    up, proxy = cached
    await post(proxy, chat())  # answer 1 stored

    resp, body = await post(proxy, chat(), headers={"Cache-Control": "no-cache"})
    assert resp.headers[CACHE] == "bypass"
    assert b"answer 2" in body
    resp, body = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"
    assert b"answer 2" in body  # the no-cache answer replaced the entry

    resp, body = await post(proxy, chat(), headers={"Cache-Control": "max-age=0, no-store"})
    assert resp.headers[CACHE] == "bypass"
    assert b"answer 3" in body
    resp, body = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"
    assert b"answer 2" in body  # no-store neither read nor wrote
    assert up.calls == 3
    assert cache_count(proxy, "bypass") == 2


async def test_only_caching_aliases_are_cached_and_carry_the_header(cached):
    up, proxy = cached
    for _ in range(2):
        resp, _ = await post(proxy, chat("mana/plain"))
        assert CACHE not in resp.headers
    for _ in range(2):
        resp, _ = await post(proxy, chat("a/m1"))  # provider/model: only with `cache.direct: true`
        assert CACHE not in resp.headers
    assert up.calls == 4


async def test_direct_requests_cache_when_the_config_says_so(make_upstream, make_proxy, backend, redis_if_needed):
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, backend, redis_if_needed, cache={"direct": True}))
    await post(proxy, chat("a/m1"))
    resp, body = await post(proxy, chat("a/m1"))
    assert resp.headers[CACHE] == "hit"
    assert b"answer 1" in body
    assert cache_count(proxy, "hit", alias="direct") == 1


async def test_a_hit_leaves_the_llm_health_and_fallback_series_alone(cached, caplog):
    up, proxy = cached
    caplog.set_level(logging.INFO, logger="manaproxy.request")
    await post(proxy, chat())
    requests = value(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="false")
    assert requests == 1
    await post(proxy, chat())
    await asyncio.sleep(0)  # the records are handed to the observers at the end of the loop's turn
    assert value(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="false") == 1
    assert value(proxy, "mana_llm_alias_resolved_total", alias="mana/x", target="a/m1") == 1
    assert proxy.gateway.health.get("a").in_flight == 0
    assert up.calls == 1
    lines = [parse_logfmt(r.getMessage()) for r in caplog.records if r.name == "manaproxy.request"]
    assert [(line["cache"], line["resolved"], line["status"]) for line in lines] == [
        ("miss", "a/m1", "200"),
        ("hit", "-", "200"),
    ]


async def test_entries_expire_after_their_ttl(make_upstream, make_proxy, backend, redis_if_needed):
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, backend, redis_if_needed, alias_cache={"ttl_seconds": 0.5}))
    await post(proxy, chat())
    resp, _ = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"
    await asyncio.sleep(0.6)
    resp, body = await post(proxy, chat())
    assert resp.headers[CACHE] == "miss"
    assert b"answer 2" in body


async def test_one_client_never_reads_another_clients_entries(make_upstream, make_proxy, backend, redis_if_needed):
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, backend, redis_if_needed), api_keys=[b"key-one", b"key-two"])
    one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    await post(proxy, chat(), headers=one)
    resp, body = await post(proxy, chat(), headers=two)
    assert resp.headers[CACHE] == "miss"
    assert b"answer 2" in body
    resp, body = await post(proxy, chat(), headers=one)
    assert resp.headers[CACHE] == "hit"
    assert b"answer 1" in body
    resp, body = await post(proxy, chat(), headers=two)
    assert resp.headers[CACHE] == "hit"
    assert b"answer 2" in body


# -- never stored ----------------------------------------------------------------------------------------------


async def test_errors_are_never_stored(cached):
    up, proxy = cached
    up.queue(status_reply(400, "bad request"), status_reply(500))
    resp, _ = await post(proxy, chat())
    assert resp.status == 400
    assert resp.headers[CACHE] == "miss"  # every answer of a caching alias says what the cache did
    resp, _ = await post(proxy, chat())
    assert resp.status == 500  # the lone entry's own status
    assert resp.headers[CACHE] == "miss"
    resp, body = await post(proxy, chat())
    assert (resp.status, resp.headers[CACHE]) == (200, "miss")
    assert b"answer 1" in body
    assert up.calls == 3


async def test_a_truncated_stream_is_never_stored(cached):
    up, proxy = cached
    # Cut mid-stream, and ended cleanly but without [DONE] (the relay adds an error event to both).
    up.queue(
        sse_reply(chat_chunks("m1", ["cut", "short"]), cut_after=2), sse_reply(chat_chunks("m1", ["no"]), done=False)
    )
    for _ in range(2):
        resp, body = await post(proxy, chat(stream=True))
        assert resp.headers[CACHE] == "miss"
        assert not body.endswith(DONE)
    resp, body = await post(proxy, chat(stream=True))
    assert resp.headers[CACHE] == "miss"
    assert body.endswith(DONE)
    assert up.calls == 3


async def test_several_choices_are_never_cached(cached):
    up, proxy = cached
    for _ in range(2):
        resp, _ = await post(proxy, chat(n=2))
        assert resp.headers[CACHE] == "bypass"
    resp, _ = await post(proxy, chat(n=1))
    assert resp.headers[CACHE] == "miss"
    assert up.calls == 3


async def test_multipart_bodies_are_never_cached(cached):
    up, proxy = cached
    up.default = json_reply({"text": "hello"})
    for _ in range(2):
        form = FormData()
        form.add_field("model", "mana/x")
        form.add_field("file", b"RIFF0000WAVE", filename="a.wav", content_type="audio/wav")
        resp = await proxy.client.post("/v1/audio/transcriptions", data=form)
        assert resp.status == 200
        await resp.read()
        assert resp.headers[CACHE] == "bypass"
    assert up.calls == 2


async def test_answers_over_max_entry_bytes_are_never_stored(make_upstream, make_proxy, backend, redis_if_needed):
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, backend, redis_if_needed, cache={"max_entry_bytes": 100}))
    for stream in (False, True, False, True):
        resp, _ = await post(proxy, chat(stream=stream))
        assert resp.headers[CACHE] == "miss"
    assert up.calls == 4


# -- reloads ---------------------------------------------------------------------------------------------------


async def test_a_reload_that_changes_the_chain_starts_the_alias_afresh(
    cached, backend, redis_if_needed, tmp_path: Path
):
    up, proxy = cached
    await post(proxy, chat())
    same = cache_config(up, backend, redis_if_needed)
    assert proxy.reload_to(tmp_path, same + "\n# touched\n")
    resp, _ = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"  # nothing the answer depends on changed

    assert proxy.reload_to(tmp_path, cache_config(up, backend, redis_if_needed, chain=["a/m1", "a/m2"]))
    resp, body = await post(proxy, chat())
    assert resp.headers[CACHE] == "miss"
    assert b"answer 2" in body
    resp, _ = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"


# -- Redis gone, slow, back (the redis backend only) ----------------------------------------------------------


async def test_a_redis_killed_mid_run_costs_no_request(make_upstream, make_proxy, redis_server, caplog):
    redis = redis_server
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, "redis", redis))
    caplog.set_level(logging.INFO, logger="manaproxy.redis")
    await post(proxy, chat())
    resp, _ = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"

    redis.kill()
    for index in range(5):
        resp, body = await post(proxy, chat(stream=bool(index % 2)))
        assert resp.status == 200
        assert resp.headers[CACHE] == "error"
        assert b"answer" in body
    assert cache_count(proxy, "error") == 5
    assert value(proxy, "mana_llm_redis_errors_total", feature="cache") >= 5
    warnings = [r for r in caplog.records if r.name == "manaproxy.redis" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert up.calls == 6

    redis.start()  # a restart: empty, on the same socket
    await wait_for(lambda: proxy.gateway.redis.up, timeout=5)
    assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    resp, _ = await post(proxy, chat())
    assert resp.headers[CACHE] == "miss"
    resp, body = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"
    assert b"answer 7" in body


async def test_a_redis_that_answers_nothing_delays_a_request_by_the_timeout_at_most(
    make_upstream, make_proxy, redis_server
):
    redis = redis_server
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, "redis", redis, timeout=0.1))
    await post(proxy, chat())  # connected
    redis.pause()
    try:
        started = perf_counter()
        resp = await proxy.client.post(CHAT, json=chat())
        await resp.read()
        assert perf_counter() - started < 1.0  # 0.1 s for the lookup, and nothing for the store
        assert (resp.status, resp.headers[CACHE]) == (200, "error")
    finally:
        redis.resume()


async def test_a_redis_password_never_reaches_a_log_line_or_a_response(make_upstream, make_proxy, caplog):
    up = await make_upstream("a")
    up.default = numbered()
    raw = yaml.safe_load(cache_config(up, "redis", None))
    raw["redis"] = {"url": f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0", "timeout_seconds": 0.5}
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(yaml.safe_dump(raw))
    for _ in range(3):
        resp, body = await post(proxy, chat())
        assert (resp.status, resp.headers[CACHE]) == (200, "error")
        assert b"hunter2" not in body
    metrics = await (await proxy.client.get("/metrics")).text()
    assert "hunter2" not in metrics
    warnings = [r.getMessage() for r in caplog.records if r.name == "manaproxy.redis" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "redis://***@127.0.0.1:" in warnings[0]
    assert not [r for r in caplog.records if "hunter2" in r.getMessage()]


async def test_a_responses_stream_is_stored_only_when_it_completed(cached):
    up, proxy = cached
    body = {"model": "mana/x", "input": "hi", "stream": True}
    up.queue(
        responses_stream(typed_events("m1", end="response.failed")),
        responses_stream(typed_events("m1", end="response.incomplete")),
        responses_stream(typed_events("m1")),
    )
    for end in ("response.failed", "response.incomplete", "response.completed"):
        resp, answer = await post(proxy, body, path="/v1/responses")
        assert (resp.status, resp.headers[CACHE]) == (200, "miss")
        assert f"event: {end}".encode() in answer
    resp, replayed = await post(proxy, body, path="/v1/responses")
    assert resp.headers[CACHE] == "hit"
    assert replayed == answer
    assert up.calls == 3


async def test_a_reload_that_changes_redis_says_it_waits_for_a_restart(
    cached, backend, redis_if_needed, tmp_path, caplog
):
    up, proxy = cached
    caplog.set_level(logging.WARNING, logger="manaproxy.reload")
    assert proxy.reload_to(tmp_path, cache_config(up, backend, redis_if_needed) + "\n# touched\n")
    assert not [r for r in caplog.records if r.name == "manaproxy.reload"]
    assert proxy.reload_to(tmp_path, cache_config(up, backend, redis_if_needed, timeout=0.25))
    warnings = [r.getMessage() for r in caplog.records if r.name == "manaproxy.reload"]
    assert warnings == (["redis: changed: it takes effect at the next restart"] if backend == "redis" else [])


async def test_a_full_redis_refuses_stores_and_costs_no_request(make_upstream, make_proxy, redis_server, caplog):
    import redis as redis_client

    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, "redis", redis_server))
    caplog.set_level(logging.INFO, logger="manaproxy.redis")
    admin = redis_client.Redis.from_url(redis_server.url)
    admin.config_set("maxmemory", 1)  # every write is refused (OOM, noeviction); reads still answer
    try:
        for number in (1, 2, 3):
            resp, body = await post(proxy, chat())
            assert (resp.status, resp.headers[CACHE]) == (200, "miss")
            assert f"answer {number}".encode() in body
        assert value(proxy, "mana_llm_redis_errors_total", feature="cache") == 3
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "refused" in warnings[0]
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    await post(proxy, chat())  # stored now
    resp, body = await post(proxy, chat())
    assert resp.headers[CACHE] == "hit"
    assert b"answer 4" in body
    assert any("writes succeed again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_the_memory_backend_reports_its_bytes(make_upstream, make_proxy):
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, "memory", None, cache={"max_bytes": 3000}))
    assert value(proxy, "mana_llm_cache_bytes") == 0
    _, first = await post(proxy, chat())
    held = value(proxy, "mana_llm_cache_bytes")
    assert held == len(first) + 256
    for index in range(20):  # more than 3000 bytes of entries: the least recently used go
        await post(proxy, chat(seed=index))
    assert 0 < value(proxy, "mana_llm_cache_bytes") <= 3000


# -- a large body ---------------------------------------------------------------------------------------------


def large_chat(marker: str, members: int) -> bytes:
    """A chat body with `members` metadata members (500 000: ~7 MB, ~0.4 s to canonicalise)."""
    metadata: dict[str, Any] = {f"k{index:07d}": 0.5 for index in range(members)}
    metadata["marker"] = marker
    return orjson.dumps({**chat(), "metadata": metadata})


async def post_large(proxy: Proxy, raw: bytes) -> Any:
    """`post` for a large body (streamed from a file object: aiohttp warns about large raw bytes)."""
    resp = await proxy.client.post(CHAT, data=io.BytesIO(raw), headers={"Content-Type": "application/json"})
    answer = await resp.read()
    await proxy.gateway.cache.settle()
    return resp, answer


async def test_a_body_canonicalised_off_the_loop_hits_and_misses_as_a_small_one(cached):
    up, proxy = cached
    first, other = large_chat("one", 30_000), large_chat("two", 30_000)
    assert len(first) > OFF_LOOP_BYTES
    for raw, expected in ((first, "miss"), (first, "hit"), (other, "miss"), (other, "hit"), (first, "hit")):
        resp, _ = await post_large(proxy, raw)
        assert (resp.status, resp.headers[CACHE]) == (200, expected)
    assert up.calls == 2


async def test_the_loop_keeps_answering_while_large_bodies_are_canonicalised(make_upstream, make_proxy):
    up = await make_upstream("a")
    up.default = numbered()
    proxy = await make_proxy(cache_config(up, "memory", None))
    first = large_chat("one", 500_000)
    await post_large(proxy, first)  # stored (the fake upstream reads it on this loop: not measured)

    slowest = 0.0
    hits = [asyncio.ensure_future(post_large(proxy, first)) for _ in range(2)]
    while not all(task.done() for task in hits):  # a turn of the loop, then /health: a blocked loop shows
        started = perf_counter()
        await asyncio.sleep(0.01)
        assert (await proxy.client.get("/health")).status == 200
        slowest = max(slowest, perf_counter() - started)
    for task in hits:
        resp, body = task.result()
        assert (resp.status, resp.headers[CACHE]) == (200, "hit")
        assert b"answer 1" in body
    # On the loop, /health waited behind both canonicalisations (~0.9 s idle); off it, ~0.1 s.
    assert slowest < 0.4, slowest
