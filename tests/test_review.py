"""Adversarial review of the request path: one end-to-end test per finding.

Tests marked `xfail(strict=True)` pin down a bug found in review (the reason names it); they start
passing, and so fail the suite, once the bug is fixed, so the marker is removed with the fix. The plain
tests cover risky behaviours checked in review and found correct, which no other test exercised.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from typing import Any

import orjson
import pytest
from aiohttp import web

from manaproxy.app import create_app
from manaproxy.config import parse_config

from .conftest import build_config
from .fakes import (
    Recorded,
    chat_chunks,
    chat_completion,
    json_reply,
    sse_event,
    sse_reply,
    status_reply,
    stream_bytes,
    wait_for,
)

CHAT = "/v1/chat/completions"
DONE = b"data: [DONE]\n\n"
PROVIDER_KEY = "test-key-0123456789"


def chat(model: str = "mana/x", *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def sse_bytes(model: str, words: list[str]) -> list[bytes]:
    return [sse_event(chunk) for chunk in chat_chunks(model, words)]


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send `request` verbatim (headers a client library would refuse to send) and read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


# == Bugs =========================================================================================


async def test_body_nested_too_deep_to_forward_is_a_400_not_a_provider_outage(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health={"failure_threshold": 1}))
    body = b'{"model": "mana/x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"

    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})
    await resp.read()

    health = proxy.gateway.health
    assert (health.get("a").breaker.consecutive_failures, health.breaker("a")) == (0, "closed")
    assert resp.status == 400


async def test_body_nested_within_what_can_be_forwarded_reaches_the_upstream_intact(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    nested: Any = []
    for _ in range(200):
        nested = [nested]

    resp = await proxy.client.post(CHAT, json={"model": "mana/x", "messages": nested})

    assert resp.status == 200
    assert a.requests[0].json == {"model": "m1", "messages": nested}


async def test_undecodable_compressed_request_body_is_a_400(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(
        CHAT, data=b"this is not gzip", headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )

    assert resp.status == 400
    assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    assert a.calls == 0


async def test_gzip_request_body_is_decoded_before_it_is_forwarded(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(
        CHAT,
        data=gzip.compress(orjson.dumps(chat())),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )

    assert resp.status == 200
    assert a.requests[0].json["model"] == "m1"
    assert "Content-Encoding" not in a.requests[0].headers


async def test_gzip_bomb_is_limited_by_its_decoded_size(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server={"max_body_bytes": 10_000}))
    bomb = gzip.compress(b'{"model": "mana/x", "pad": "' + b"x" * 2_000_000 + b'"}')
    assert len(bomb) < 10_000

    resp = await proxy.client.post(
        CHAT, data=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )

    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    assert a.calls == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_redirect_is_not_followed_with_its_credentials(make_upstream, make_proxy, stream):
    a = await make_upstream("a")
    elsewhere = await make_upstream("elsewhere")  # another origin: same loopback address, other port

    async def redirect(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"{elsewhere.base_url}/chat/completions")

    a.default = redirect
    spec = {"base_url": a, "api_key": PROVIDER_KEY, "headers": {"X-Api-Key": "test-header-secret-1"}}
    proxy = await make_proxy(build_config({"a": spec}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))
    await resp.read()

    assert elsewhere.calls == 0
    assert resp.status != 200


async def test_upstream_4xx_to_a_stream_request_is_relayed_whole(make_upstream, make_proxy):
    a = await make_upstream("a")
    upstream_error = {
        "error": {
            "message": "messages.0.content: field required",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "missing_field",
        }
    }
    body = orjson.dumps(upstream_error)
    a.default = stream_bytes([body[:20], body[20:]], status=400, content_type="application/json")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.status == 400
    assert await resp.json() == upstream_error


async def test_half_open_trial_is_not_blocked_by_a_stream_from_before_the_breaker_opened(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.queue(sse_reply(chat_chunks("m1", ["still", "going"]), hang_after=2), status_reply(500), status_reply(500))
    a.default = json_reply(chat_completion("m1"))
    b.default = json_reply(chat_completion("m2"))
    health = {"failure_threshold": 2, "backoff_seconds": 0.2}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health))

    long_stream = await proxy.client.post(CHAT, json=chat(stream=True))
    await long_stream.content.readline()
    for _ in range(2):  # two 500s open a's breaker; b answers them
        resp = await proxy.client.post(CHAT, json=chat())
        assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    await wait_for(lambda: proxy.gateway.health.breaker("a") == "half_open")

    resp = await proxy.client.post(CHAT, json=chat())

    long_stream.close()
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"  # the trial goes to a


async def test_connection_reset_after_done_is_a_completed_stream(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = stream_bytes([*sse_bytes("m1", ["Hel", "lo"]), DONE], cut=True, pause=0.01)
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert body.endswith(DONE)
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0


async def test_a_failed_model_list_is_logged_without_the_provider_key(make_upstream, make_proxy, caplog):
    a = await make_upstream("a")
    a.default = status_reply(401, f"Incorrect API key provided: {PROVIDER_KEY}")
    # Under /v2 the fake's scripted handler, not its built-in model list, answers GET /models.
    base_url = a.base_url.removesuffix("/v1") + "/v2"
    proxy = await make_proxy(build_config({"a": {"base_url": base_url, "api_key": PROVIDER_KEY}}, {"mana/x": ["a/m1"]}))
    caplog.set_level(logging.DEBUG, logger="manaproxy")

    resp = await proxy.client.get("/v1/models")

    assert resp.status == 200
    assert PROVIDER_KEY not in await resp.text()
    assert any("did not list" in record.getMessage() for record in caplog.records)
    assert not [record.getMessage() for record in caplog.records if PROVIDER_KEY in record.getMessage()]


async def test_a_failed_model_list_is_not_fetched_again_within_the_ttl(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    b.models_status = 500
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1"]}))

    for _ in range(2):
        resp = await proxy.client.get("/v1/models")
        assert resp.status == 200

    assert (a.models_calls, b.models_calls) == (1, 1)


async def test_big_integers_in_the_body_reach_the_upstream_unchanged(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    body = b'{"model": "mana/x", "messages": [], "seed": 123456789012345678901234567890}'

    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})

    assert resp.status == 200
    assert b"123456789012345678901234567890" in a.requests[0].body


def test_create_app_can_be_called_before_the_event_loop_runs() -> None:
    config = parse_config(
        "providers: {a: {base_url: 'http://127.0.0.1:9/v1'}}\naliases: {mana/x: {chain: [a/m1]}}", env={}
    )
    create_app(config, probes=False)


# == Risky behaviours checked and found correct ===================================================


async def test_accept_header_that_is_not_utf8_neither_fails_nor_hurts_the_provider(make_upstream, make_proxy):
    """The client's Accept is the one header forwarded as sent: undecodable bytes must not break the call."""
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health={"failure_threshold": 1}))
    assert proxy.client.server.port is not None
    body = orjson.dumps(chat())
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAccept: \xff\xfe text/\xc3\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    ) + body

    answer = await raw_exchange(proxy.client.server.port, request)

    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"X-Mana-LLM-Resolved: a/m1" in answer
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0


async def test_client_leaving_mid_stream_frees_the_concurrency_slot(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.queue(sse_reply(chat_chunks("m1", ["one", "two"]), hang_after=2))
    a.default = sse_reply(chat_chunks("m1", ["again"]))
    spec = {"base_url": a, "max_concurrent": 1}
    proxy = await make_proxy(build_config({"a": spec, "b": b}, {"mana/x": ["a/m1", "b/m2"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert await resp.content.readline()  # committed: the relay is running
    resp.close()
    await wait_for(a.requests[0].disconnected.is_set)

    assert proxy.gateway.health.get("a").in_flight == 0
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert (await resp.read()).endswith(DONE)
    assert b.calls == 0


async def test_keepalive_comments_alone_never_commit_and_fall_back_at_first_byte_timeout(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = stream_bytes([b": ping\n\n"] * 40, pause=0.025)  # a second of comments, no data event
    b.default = sse_reply(chat_chunks("m2", ["from b"]))
    spec = {"base_url": a, "timeouts": {"first_byte": 0.2}}
    proxy = await make_proxy(build_config({"a": spec, "b": b}, {"mana/x": ["a/m1", "b/m2"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    assert b": ping" not in body
    assert body.endswith(DONE)
    assert proxy.gateway.health.get("a").breaker.last_error == "timed out before the first byte"


async def test_a_stream_in_flight_keeps_its_provider_across_a_reload_that_removes_it(
    make_upstream, make_proxy, tmp_path
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    gate = asyncio.Event()
    first, *rest = sse_bytes("m1", ["Hel", "lo"])

    async def held_stream(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await gate.wait()
        for event in [*rest, DONE]:
            await response.write(event)
        await response.write_eof()
        return response

    a.default = held_stream
    b.default = sse_reply(chat_chunks("m2", ["new"]))
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1"]}))
    path = tmp_path / "aliases.yaml"
    path.write_text(build_config({"b": b}, {"mana/x": ["b/m2"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert await resp.content.readline()
    assert proxy.reloader.reload(str(path))
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
    path = tmp_path / "aliases.yaml"
    path.write_text(build_config({"a": new}, {"mana/x": ["a/m1"]}))

    before = await (await proxy.client.get("/v1/models")).json()
    assert proxy.reloader.reload(str(path))
    after = await (await proxy.client.get("/v1/models")).json()

    assert "a/stale" in {item["id"] for item in before["data"]}
    assert {item["id"] for item in after["data"]} == {"mana/x", "a/fresh"}
