"""Protocol edges from issue 14's hostile run: an upstream status no HTTP answer has, `100 Continue` before
the key check, a request pipelined after an `Upgrade: h2c` one, and a Responses stream that opens with an
`error` event quoting our key."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from .fakes import raw_reply, responses_stream, typed_events
from .helpers import CHAT, assert_openai_error, build_config, chat, split_response

KEY = "test-provider-key-0123456789"


@pytest.mark.parametrize("status", [999, 600])
async def test_an_upstream_status_outside_http_is_a_failed_attempt(make_upstream, make_proxy, status):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = raw_reply(b'{"id": "x"}', status=status, content_type="application/json")
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"], "mana/lone": ["a/m1"]}))

    fell_back = await proxy.client.post(CHAT, json=chat())
    assert fell_back.status == 200, await fell_back.text()
    assert fell_back.headers["X-Mana-LLM-Resolved"] == "b/m2"

    lone = await proxy.client.post(CHAT, json=chat("mana/lone"))
    await assert_openai_error(lone, 502, "bad_response")
    assert lone.reason != str(status)


async def _exchange_with_expect(port: int, key: str) -> tuple[bytes, bytes]:
    """Send a request head with `Expect: 100-continue` and no body: (what the server says first, then what
    it says once the body is sent, if it asked for it)."""
    body = orjson.dumps(chat())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode())
        async with asyncio.timeout(5):
            first = await reader.readuntil(b"\r\n\r\n")
            if not first.startswith(b"HTTP/1.1 100"):
                return first, b""
            writer.write(body)
            return first, await reader.read()
    finally:
        writer.close()


async def test_100_continue_is_sent_only_past_the_key_check(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}), api_keys=[b"client-key-1234"])

    refused, _ = await _exchange_with_expect(proxy.port, "wrong-key")
    assert refused.startswith(b"HTTP/1.1 401"), refused  # before: `100 Continue`, then the 401

    first, answer = await _exchange_with_expect(proxy.port, "client-key-1234")
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert split_response(answer)[0] == 200
    assert a.calls == 1


async def test_a_request_pipelined_after_an_h2c_upgrade_is_answered(make_upstream, make_proxy):
    """Regression guard: on the installed aiohttp the request after an `Upgrade: h2c` one on the same
    connection is answered (the issue saw it never answered)."""
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    first = (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    second = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(first + second)
        async with asyncio.timeout(5):
            received = await reader.read()
    finally:
        writer.close()
    assert received.count(b"HTTP/1.1 200") == 2, received


async def test_a_first_responses_error_event_is_a_failure_and_never_relayed(make_upstream, make_proxy, caplog):
    caplog.set_level(logging.DEBUG)
    a = await make_upstream("a")
    b = await make_upstream("b")
    error = {"type": "error", "code": "invalid_api_key", "message": f"Incorrect API key provided: {KEY}"}
    a.default = responses_stream([b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"])
    b.default = responses_stream(typed_events("m2"))
    providers = {"a": {"base_url": a, "api_key": "${A_KEY}"}, "b": b}
    aliases = {"mana/x": ["a/m1", "b/m2"], "mana/lone": ["a/m1"]}
    proxy = await make_proxy(build_config(providers, aliases), env={"A_KEY": KEY})

    resp = await proxy.client.post("/v1/responses", json={"model": "mana/x", "input": "hi", "stream": True})
    text = await resp.text()
    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"  # before: a's error event relayed as the answer
    assert '"type":"error"' not in text
    assert "response.completed" in text

    lone = await proxy.client.post("/v1/responses", json={"model": "mana/lone", "input": "hi", "stream": True})
    lone_text = await lone.text()
    assert lone.status >= 500
    health = await (await proxy.client.get("/v1/health")).text()
    assert KEY not in text + lone_text + health + caplog.text
