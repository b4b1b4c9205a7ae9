"""The chain walk: which upstream failures fall back to the next entry, which go back to the caller,
which entries are skipped without a call, and what each upstream actually receives.

Every upstream is a real aiohttp server on loopback; a failure is scripted on the first entry and the
test checks both the client's answer and which fakes were (or were not) called.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import orjson
import pytest
from aiohttp import web

from .fakes import (
    Recorded,
    after,
    chat_answer,
    chat_chunks,
    closed_port_url,
    drop_connection,
    error_body,
    hang,
    json_reply,
    raw_reply,
    sse_reply,
    status_reply,
    stream_bytes,
    wait_for,
)
from .helpers import CHAT, FAST, assert_openai_error, build_config, chat, two_entry_proxy


async def assert_answered_by_b(resp, b, *, stream: bool) -> None:
    """The client got b's complete answer, labelled b/m2."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    if stream:
        body = await resp.read()
        assert body.endswith(b"data: [DONE]\n\n")
        assert b'"model":"b/m2"' in body
        assert b"error" not in body
    else:
        data = await resp.json()
        assert data["model"] == "b/m2"
    assert b.calls == 1
    assert b.requests[0].json["model"] == "m2"


# -- failures before the first byte: fall back ---------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_connect_error_falls_back(make_upstream, make_proxy, stream):
    b = await make_upstream("b")
    b.default = chat_answer("m2")
    providers = {"a": {"base_url": closed_port_url(), "timeouts": FAST}, "b": b}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1", "b/m2"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))

    await assert_answered_by_b(resp, b, stream=stream)


# Only `first_byte` is short: no other timeout (total 600 s by default) can do its work for it.
FIRST_BYTE_ONLY = {"timeouts": {"first_byte": 0.3}}


async def test_first_byte_timeout_without_headers_falls_back(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec=FIRST_BYTE_ONLY)
    a.default = hang()

    started = asyncio.get_running_loop().time()
    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    await assert_answered_by_b(resp, b, stream=True)
    assert a.calls == 1
    assert asyncio.get_running_loop().time() - started < 1.5
    assert proxy.gateway.health.target("a", "m1").breaker.last_error == "timed out before the first byte"


async def test_first_byte_timeout_after_headers_falls_back(make_upstream, make_proxy):
    """Headers alone are not a first byte: the wait for the first data event is bounded too."""
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec=FIRST_BYTE_ONLY)
    a.default = sse_reply(chat_chunks("m1", ["late"]), first_delay=5)

    started = asyncio.get_running_loop().time()
    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    await assert_answered_by_b(resp, b, stream=True)
    assert asyncio.get_running_loop().time() - started < 1.5
    assert proxy.gateway.health.target("a", "m1").breaker.last_error == "timed out before the first byte"
    await wait_for(a.requests[0].disconnected.is_set)


async def test_keepalive_comments_alone_never_commit_and_fall_back_at_first_byte_timeout(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec=FIRST_BYTE_ONLY)
    a.default = stream_bytes([b": ping\n\n"] * 40, pause=0.025)  # a second of comments, no data event

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    await assert_answered_by_b(resp, b, stream=True)
    assert b": ping" not in await resp.read()
    assert proxy.gateway.health.target("a", "m1").breaker.last_error == "timed out before the first byte"


async def test_unstreamed_total_timeout_falls_back(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"timeouts": {"total": 0.3}})
    a.default = hang()

    resp = await proxy.client.post(CHAT, json=chat())

    await assert_answered_by_b(resp, b, stream=False)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503])
async def test_retryable_status_falls_back(make_upstream, make_proxy, status, stream):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = status_reply(status)

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))

    await assert_answered_by_b(resp, b, stream=stream)
    assert a.calls == 1


@pytest.mark.parametrize(
    "behavior",
    [
        pytest.param(lambda: sse_reply(chat_chunks("m1", ["x"]), cut_after=0), id="headers-then-close"),
        pytest.param(
            lambda: sse_reply([b": keepalive\n\n", *chat_chunks("m1", ["x"])], cut_after=1), id="comment-then-close"
        ),
        pytest.param(lambda: sse_reply([], done=False), id="empty-stream"),
        pytest.param(drop_connection, id="no-response"),
    ],
)
async def test_upstream_closing_before_first_event_falls_back(make_upstream, make_proxy, behavior):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = behavior()

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    await assert_answered_by_b(resp, b, stream=True)
    assert a.calls == 1
    assert b"keepalive" not in await resp.read()  # nothing of a's reached the client


@pytest.mark.parametrize(
    "first",
    [
        pytest.param([error_body("overloaded")], id="error-event"),
        pytest.param([b": ping\n\n", error_body("overloaded")], id="comment-then-error-event"),
        pytest.param([{"error": "plain string error"}], id="string-error"),
    ],
)
async def test_first_sse_event_being_an_error_falls_back(make_upstream, make_proxy, first):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply(first, done=False)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    await assert_answered_by_b(resp, b, stream=True)


async def test_unstreamed_2xx_error_body_falls_back(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = json_reply(error_body("model is loading"), status=200)

    resp = await proxy.client.post(CHAT, json=chat())

    await assert_answered_by_b(resp, b, stream=False)


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(401, id="401-our-credentials-or-this-request"),
        pytest.param(403, id="403-our-credentials-or-this-request"),
        pytest.param(404, id="404-model-not-served-there"),
    ],
)
async def test_credential_errors_and_404_fall_back_and_a_request_alone_opens_no_breaker(
    make_upstream, make_proxy, status
):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, health={"failure_threshold": 1})
    a.default = status_reply(status)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    await assert_answered_by_b(resp, b, stream=True)

    # Threshold 1, and still a is tried again: a 404 says nothing about a's health, and a 401/403 may be
    # about this request or model only, which a probe with our key tells (test_provider_health.py).
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    assert a.calls == 2
    health = proxy.gateway.health
    assert (health.status("a"), health.breaker("a", "m1")) == ("healthy", "closed")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_bug_in_a_provider_module_falls_back_to_the_next_entry(
    make_upstream, make_proxy, faulty_kind, stream, caplog
):
    b = await make_upstream("b")
    b.default = chat_answer("m2")
    providers = {"f": {"kind": faulty_kind, "base_url": "http://127.0.0.1:9/v1"}, "b": b}
    proxy = await make_proxy(
        build_config(
            providers, {"mana/x": ["f/raises", "b/m2"], "mana/only": ["f/raises"]}, health={"failure_threshold": 1}
        )
    )

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))
    await assert_answered_by_b(resp, b, stream=stream)
    alone = await proxy.client.post(CHAT, json=chat("mana/only"))

    error = await assert_openai_error(alone, 503, "all_targets_failed")
    assert error["message"].endswith("f/raises=internal")
    assert "RuntimeError: a bug in the provider module" in caplog.text  # logged with its traceback
    assert proxy.gateway.health.status("f") == "healthy"  # our bug, not the provider's outage


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_redirect_is_not_followed_with_its_credentials(make_upstream, make_proxy, stream):
    a = await make_upstream("a")
    elsewhere = await make_upstream("elsewhere")  # another origin: same loopback address, other port

    async def redirect(request: web.Request, recorded: Recorded) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(f"{elsewhere.base_url}/chat/completions")

    a.default = redirect
    spec = {"base_url": a, "api_key": "test-key-0123456789", "headers": {"X-Api-Key": "test-header-secret-1"}}
    proxy = await make_proxy(build_config({"a": spec}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))

    error = await assert_openai_error(resp, 502, "http_307")  # a redirect we do not follow: a bad gateway
    assert error["message"].startswith("a/m1: HTTP 307")
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=HTTP 307"
    assert elsewhere.calls == 0


# -- the caller's fault: no fallback -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [400, 413, 422])
async def test_caller_errors_are_returned_as_is(make_upstream, make_proxy, status, stream):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    upstream_error = {
        "error": {
            "message": "messages[0].content is bad",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "x1",
        }
    }
    body = orjson.dumps(upstream_error)
    # In two writes: the error is read whole, also to a stream request (which reads up to a limit).
    a.default = stream_bytes([body[:20], body[20:]], status=status, content_type="application/json")

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))

    assert resp.status == status
    assert await resp.json() == upstream_error
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert b.calls == 0
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0


async def test_caller_error_without_openai_shape_is_wrapped(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = raw_reply(b"bad request: field 'messages' missing", status=400)

    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.status == 400
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "a/m1" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert b.calls == 0


# -- entries skipped without a call ---------------------------------------------------------------


async def test_unconfigured_provider_is_skipped_without_a_call(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"api_key": "${UNSET_VAR}"})

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    await assert_answered_by_b(resp, b, stream=True)
    assert a.calls == 0


async def test_saturated_provider_is_skipped_then_usable_again(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(
        make_upstream, make_proxy, a_spec={"max_concurrent": 1, "timeouts": {"first_byte": 10}}
    )
    release = asyncio.Event()
    a.queue(after(release, sse_reply(chat_chunks("m1", ["slow"]))))
    a.default = sse_reply(chat_chunks("m1", ["from", " a"]))

    # One request waits on a and holds its only slot.
    held = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: a.calls == 1)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    await assert_answered_by_b(resp, b, stream=True)
    assert a.calls == 1

    release.set()
    first = await held
    assert first.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert (await first.read()).endswith(b"data: [DONE]\n\n")
    assert proxy.gateway.health.get("a").in_flight == 0
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    await resp.read()
    assert a.calls == 2


async def test_client_leaving_before_first_byte_frees_the_concurrency_slot(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(
        make_upstream, make_proxy, a_spec={"max_concurrent": 1, "timeouts": {"first_byte": 10}}
    )
    a.queue(hang())
    a.default = sse_reply(chat_chunks("m1", ["from", " a"]))
    held = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: a.calls == 1)

    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    await wait_for(a.requests[0].disconnected.is_set)  # the proxy hung up on a: its handler is done

    assert proxy.gateway.health.get("a").in_flight == 0
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"


@pytest.mark.parametrize(
    "retry_after",
    [pytest.param("30", id="seconds"), pytest.param(formatdate(time.time() + 60, usegmt=True), id="date")],
)
async def test_429_with_retry_after_keeps_the_provider_out(make_upstream, make_proxy, retry_after):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.queue(status_reply(429, "slow down", headers={"Retry-After": retry_after}))
    a.default = sse_reply(chat_chunks("m1", ["a"]))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    await resp.read()

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    await resp.read()
    assert a.calls == 1  # kept out for Retry-After without being called
    assert b.calls == 2


async def test_429_with_retry_after_only_entry_reports_rate_limited(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.queue(status_reply(429, "slow down", headers={"Retry-After": "30"}))
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    first = await proxy.client.post(CHAT, json=chat())
    second = await proxy.client.post(CHAT, json=chat())

    assert (first.status, first.headers["Retry-After"]) == (429, "30")
    assert (await first.json())["error"]["message"] == "a/m1: slow down"  # the provider's own error
    assert first.headers["X-Mana-LLM-Attempts"] == "a/m1=HTTP 429"
    # Rate-limited, but the only entry: it is tried anyway, as a direct call would be (and now answers).
    assert second.status == 200
    assert a.calls == 2


# -- every entry failed ---------------------------------------------------------------------------


async def test_all_entries_failed_is_503_listing_each_entry_and_why(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    c = await make_upstream("c")
    a.default = status_reply(500)
    b.default = status_reply(502)
    providers = {"a": a, "b": b, "c": {"base_url": c, "api_key": "${UNSET_VAR}"}}
    aliases = {"mana/x": ["a/x", "b/y", "c/z"]}
    proxy = await make_proxy(build_config(providers, aliases, health={"failure_threshold": 1}))

    # Open b's breaker first (threshold 1) with a direct request: b's own 502 comes back.
    assert (await proxy.client.post(CHAT, json=chat("b/y"))).status == 502
    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) >= 1  # b is only kept out for its breaker window
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/x=HTTP 500, b/y=unhealthy, c/z=unconfigured"
    body = await resp.json()
    assert body["error"]["message"].endswith("a/x=HTTP 500, b/y=unhealthy, c/z=unconfigured")
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "all_targets_failed"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (a.calls, b.calls, c.calls) == (1, 1, 0)


async def test_all_failed_names_timeouts_connect_errors_and_saturation(make_upstream, make_proxy):
    slow = await make_upstream("slow")
    busy = await make_upstream("busy")
    slow.default = hang()
    busy.default = hang()
    providers = {
        "slow": {"base_url": slow, "timeouts": FAST},
        "gone": {"base_url": closed_port_url(), "timeouts": FAST},
        "busy": {"base_url": busy, "max_concurrent": 1, "timeouts": {"first_byte": 5}},
    }
    proxy = await make_proxy(
        build_config(providers, {"mana/x": ["slow/a", "gone/b", "busy/c"], "mana/busy": ["busy/c"]})
    )
    holder = asyncio.create_task(proxy.client.post(CHAT, json=chat("mana/busy", stream=True)))
    await wait_for(lambda: busy.calls == 1)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.status == 503
    message = (await resp.json())["error"]["message"]
    assert message.endswith("slow/a=timeout, gone/b=connect, busy/c=saturated")
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)


# -- what the upstream receives -------------------------------------------------------------------


async def test_upstream_request_carries_provider_identity_not_the_clients(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(500)
    b.default = sse_reply(chat_chunks("m2", ["ok"]))
    providers = {
        "a": {"base_url": a, "api_key": "${A_KEY}"},
        "b": {
            "base_url": b,
            "api_key": "test-key-b",
            "headers": {"HTTP-Referer": "https://app.example", "X-Title": "t"},
        },
    }
    proxy = await make_proxy(
        build_config(providers, {"mana/x": ["a/m1", "b/vendor/m2"]}),
        env={"A_KEY": "test-key-a"},
        api_keys=[b"client-key-1"],
    )
    payload = chat(
        stream=True,
        temperature=0.2,
        tools=[{"type": "function", "function": {"name": "f"}}],
        user="u1",
        stream_options={"include_usage": True},  # the client's own: sent as it is (no usage injected)
    )
    client_headers = {
        "Authorization": "Bearer client-key-1",
        "X-API-Key": "client-key-1",
        "Cookie": "session=secret-cookie",
        "Accept-Encoding": "gzip, br",
        "Proxy-Authorization": "Basic cHJveHk6cHc=",
        "X-Request-ID": "req-123",
        "Accept": "text/event-stream",
    }

    resp = await proxy.client.post(CHAT, json=payload, headers=client_headers)
    assert resp.status == 200
    await resp.read()

    assert [r.headers["Authorization"] for r in (a.requests[0], b.requests[0])] == [
        "Bearer test-key-a",
        "Bearer test-key-b",
    ]
    sent = b.requests[0]
    assert sent.method == "POST"
    assert sent.path == "/v1/chat/completions"
    assert sent.json == {**payload, "model": "vendor/m2"}
    assert a.requests[0].json == {**payload, "model": "m1"}
    assert sent.headers["HTTP-Referer"] == "https://app.example"
    assert sent.headers["X-Title"] == "t"
    assert "HTTP-Referer" not in a.requests[0].headers  # extra headers are per provider
    assert sent.headers["X-Request-ID"] == "req-123"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Accept"] == "text/event-stream"
    for recorded in (a.requests[0], b.requests[0]):
        assert "X-API-Key" not in recorded.headers
        assert "Cookie" not in recorded.headers
        assert "Proxy-Authorization" not in recorded.headers
        assert recorded.headers.get("Accept-Encoding", "identity") == "identity"
        assert not any("client-key-1" in value for value in recorded.headers.values())


async def test_provider_without_key_gets_no_authorization_header(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat(), headers={"Authorization": "Bearer client-secret-1"})

    assert resp.status == 200
    assert "Authorization" not in a.requests[0].headers
    # Without a client X-Request-ID one is generated, sent upstream and returned to the client.
    assert a.requests[0].headers["X-Request-ID"] == resp.headers["X-Request-ID"]
    assert len(resp.headers["X-Request-ID"]) >= 16


async def test_other_endpoints_forward_to_the_same_path(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = json_reply({"object": "list", "data": [], "model": "m1"})
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    for path in ("/v1/embeddings", "/v1/completions", "/v1/moderations", "/v1/rerank"):
        resp = await proxy.client.post(path, json={"model": "mana/x", "input": "hi"})
        assert resp.status == 200, path
        assert (await resp.json())["model"] == "a/m1"

    assert [r.path for r in a.requests] == ["/v1/embeddings", "/v1/completions", "/v1/moderations", "/v1/rerank"]
    assert all(r.json == {"model": "m1", "input": "hi"} for r in a.requests)


# -- issue 16: a rate-limited entry is skipped while another can be tried ---------------------------


async def test_a_rate_limited_entry_is_skipped_while_another_serves_and_tried_when_none_is_left(
    make_upstream, make_proxy
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(429, "slow down", headers={"retry-after-ms": "30000"})
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}))

    first = await proxy.client.post(CHAT, json=chat())  # a: 429 → b
    second = await proxy.client.post(CHAT, json=chat())  # a kept out for 30 s → b at once
    b.default = status_reply(500, "b is down")
    third = await proxy.client.post(CHAT, json=chat())  # b fails: a is the only entry left, tried anyway

    assert (first.status, second.status) == (200, 200)
    assert second.headers["X-Mana-LLM-Resolved"] == "b/m2"
    assert (third.status, third.headers["Retry-After"]) == (503, "5")  # several entries: as before
    assert third.headers["X-Mana-LLM-Attempts"] == "b/m2=HTTP 500, a/m1=HTTP 429"  # a tried, not skipped
    assert (a.calls, b.calls) == (2, 3)


async def test_a_429_never_opens_a_breaker(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = status_reply(429, "slow down")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health={"failure_threshold": 1}))

    statuses = [(await proxy.client.post(CHAT, json=chat())).status for _ in range(4)]

    assert statuses == [429] * 4  # every try reaches the provider, as a direct call does
    assert (a.calls, proxy.gateway.health.breaker("a", "m1")) == (4, "closed")
