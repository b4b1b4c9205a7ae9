"""The SSE relay and the commit point, byte for byte.

What an upstream streams reaches the client unchanged except for each event's top-level `model`;
status and headers leave only once the first upstream event is in hand; a failure after that ends the
stream with an error event and no `[DONE]`; a client that leaves gets its upstream hung up on.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from .fakes import (
    chat_chunks,
    chat_completion,
    hang,
    json_reply,
    raw_reply,
    sse_event,
    sse_reply,
    status_reply,
    stream_bytes,
    wait_for,
)
from .helpers import CHAT, DONE, build_config, chat, error_event_of, events_of, post_chat, two_entry_proxy

# -- bytes through unchanged except `model` -------------------------------------------------------

VARIED_STREAM = (
    b": keepalive\n\n"
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m1","system_fingerprint":"fp_1",'
    b'"x_vendor":{"trace":[1,2,{"model":"inner"}]},"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b"event: message\nid: 7\n"
    b'data: {"model": "m1", "choices": [{"index": 0, "delta": {"content": "H\xc3\xa9 \\"q\\" \xf0\x9f\x99\x82"}}]}\n\n'
    b"retry: 1000\n\n"
    b": another comment\n\n"
    b'data:{"id":"c1","model":"m1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m1","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)


# VARIED_STREAM ends with a usage chunk: what a server sends to a client that asked for it.
USAGE_ASKED = {"include_usage": True}


def relabelled(raw: bytes, old: bytes = b"m1", new: bytes = b"a/m1") -> bytes:
    """`raw` with exactly the top-level model values replaced, as the client must see it."""
    return raw.replace(b'"model":"' + old + b'"', b'"model":"' + new + b'"').replace(
        b'"model": "' + old + b'"', b'"model": "' + new + b'"'
    )


async def test_stream_passes_through_byte_for_byte_except_model(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = stream_bytes([VARIED_STREAM], pause=0)

    resp = await proxy.client.post(CHAT, json=chat(stream=True, stream_options=USAGE_ASKED))

    assert resp.status == 200
    body = await resp.read()
    assert body == relabelled(VARIED_STREAM)
    assert b'"model":"inner"' in body  # a nested `model` is not the answer's model


async def test_crlf_line_endings_pass_through(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    raw = VARIED_STREAM.replace(b"\n", b"\r\n")
    a.default = stream_bytes([raw], pause=0)

    resp = await proxy.client.post(CHAT, json=chat(stream=True, stream_options=USAGE_ASKED))

    body = await resp.read()
    assert body == relabelled(raw)
    assert body.endswith(b"data: [DONE]\r\n\r\n")
    assert b"error" not in body


@pytest.mark.parametrize("separator", [b"\n", b"\r\n"])
async def test_event_split_across_tcp_writes_is_reassembled(make_upstream, make_proxy, separator):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    raw = VARIED_STREAM.replace(b"\n", separator)
    # Cut everywhere it hurts: inside `"model"`, inside its value, between the two newlines of a
    # boundary, inside a multi-byte UTF-8 character, inside `[DONE]`.
    cuts = sorted(
        {
            raw.index(b'"mod') + 3,
            raw.index(b'"m1"') + 2,
            raw.index(b"}" + separator + separator) + 1 + len(separator),
            raw.index(b"\xf0\x9f") + 1,
            raw.index(b'"model": "m1"') + 10,
            raw.index(b"[DO") + 3,
            len(raw) - 1,
        }
    )
    pieces = [raw[start:end] for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    a.default = stream_bytes(pieces, pause=0.01)

    resp = await proxy.client.post(CHAT, json=chat(stream=True, stream_options=USAGE_ASKED))

    assert await resp.read() == relabelled(raw)


async def test_llama_cpp_chunk_with_model_after_nested_choices(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    llama = {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": "Hi"}}],
        "created": 1700000000,
        "id": "chatcmpl-x",
        "model": "gemma",
        "system_fingerprint": "b4000",
        "object": "chat.completion.chunk",
        "timings": {"predicted_ms": 1.5},
    }
    head = b": comment\n\n"
    a.default = stream_bytes([head + sse_event(llama) + DONE], pause=0)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    body = await resp.read()
    assert body.startswith(head)
    assert body.endswith(DONE)
    event = events_of(body)[1]
    assert orjson.loads(event[len(b"data: ") :]) == {**llama, "model": "a/m1"}


async def test_stream_response_headers(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply(chat_chunks("m1", ["x"]))

    resp = await proxy.client.post(CHAT, json=chat(stream=True), headers={"X-Request-ID": "stream-1"})

    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert resp.headers["X-Request-ID"] == "stream-1"
    assert "Content-Length" not in resp.headers
    body = await resp.read()
    assert {orjson.loads(e[6:])["model"] for e in events_of(body)[:-1]} == {"a/m1"}


# -- the commit point -----------------------------------------------------------------------------


async def test_headers_wait_for_the_first_upstream_event(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply(chat_chunks("m1", ["late"]), first_delay=0.3)
    loop = asyncio.get_running_loop()

    started = loop.time()
    resp = await proxy.client.post(CHAT, json=chat(stream=True))  # returns once status and headers arrive

    assert loop.time() - started >= 0.25
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert (await resp.read()).endswith(DONE)


@pytest.mark.parametrize(
    "behavior",
    [
        pytest.param(lambda: sse_reply(chat_chunks("m1", ["x"]), first_delay=0.1, cut_after=0), id="delay-then-cut"),
        pytest.param(
            lambda: stream_bytes([b": keepalive\n\n", b'data: {"id":"c1","model":"m1","cho'], cut=True),
            id="comment-and-half-event-then-cut",
        ),
        pytest.param(
            lambda: sse_reply([b": keepalive\n\n", {"error": {"message": "overloaded"}}], first_delay=0.1, done=False),
            id="delay-then-error-event",
        ),
    ],
)
async def test_failure_before_first_event_gives_the_fallbacks_clean_answer(make_upstream, make_proxy, behavior):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = behavior()

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "b/m2"
    body = await resp.read()
    assert body.endswith(DONE)
    assert b"keepalive" not in body
    assert b"error" not in body
    assert b'"model":"a/' not in body
    assert (a.calls, b.calls) == (1, 1)


async def test_mid_stream_cut_ends_with_error_event_and_never_calls_the_next_entry(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply(chat_chunks("m1", ["Hel", "lo", " world"]), cut_after=2)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    body = await resp.read()
    events = events_of(body)
    assert len(events) == 3  # the two relayed events, then ours
    assert [orjson.loads(e[6:])["model"] for e in events[:2]] == ["a/m1", "a/m1"]
    error = error_event_of(body)
    assert "a/m1" in error["message"]
    assert error["code"] == "upstream_error"
    assert b"[DONE]" not in body
    assert b.calls == 0


@pytest.mark.parametrize("cut", [True, False], ids=["connection-aborted", "body-ended-cleanly"])
async def test_an_end_inside_an_event_never_relays_the_half_event(make_upstream, make_proxy, cut):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    first = sse_event(chat_chunks("m1", ["Hel"])[1])
    a.default = stream_bytes([first, b'data: {"id":"half-event","model":"m1","choices":[{"index":0,"del'], cut=cut)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    body = await resp.read()
    assert body.startswith(relabelled(first))
    assert len(events_of(body)) == 2
    assert error_event_of(body)["code"] == "upstream_error"
    assert b"half-event" not in body
    assert b.calls == 0


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b'data: {"id":"half-event","model":"m1","cho\ndata: [DONE]', id="half-event-then-done"),
        pytest.param(b'data: [DONE]\ndata: {"id":"half-event","model":"m1","cho', id="done-then-half-event"),
    ],
)
async def test_an_end_inside_an_event_never_relays_the_half_event_with_done(make_upstream, make_proxy, tail):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    first = sse_event(chat_chunks("m1", ["Hel"])[1])
    a.default = stream_bytes([first, tail])  # the body then ends cleanly, mid-event

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert body.startswith(relabelled(first))
    assert b"half-event" not in body
    assert b.calls == 0
    if tail.startswith(b"data: [DONE]"):  # the end came first: what trails it is past the answer
        assert body.endswith(b"data: [DONE]\n\n")
    else:  # half an event is lost: the answer must not look complete
        assert error_event_of(body)["code"] == "upstream_error"
        assert b"data: [DONE]" not in body


async def test_a_bug_while_relaying_ends_the_stream_with_an_error_event(make_proxy, faulty_kind, caplog):
    providers = {"f": {"kind": faulty_kind, "base_url": "http://127.0.0.1:9/v1"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["f/stream-raises"]}, health={"failure_threshold": 1}))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert (resp.status, resp.headers["X-Mana-LLM-Resolved"]) == (200, "f/stream-raises")
    assert len(events_of(body)) == 2  # the first event, then ours
    error = error_event_of(body)
    assert (error["code"], error["type"]) == ("upstream_error", "server_error")
    assert "internal error while relaying" in error["message"]
    assert b"[DONE]" not in body
    assert "RuntimeError: a bug while relaying" in caplog.text  # logged with its traceback
    assert proxy.gateway.health.status("f") == "healthy"  # our bug, not the provider's failure


async def test_idle_timeout_mid_stream_ends_with_error_event(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"timeouts": {"idle": 0.3}})
    a.default = sse_reply(chat_chunks("m1", ["Hel", "lo", " world"]), hang_after=2)
    loop = asyncio.get_running_loop()

    started = loop.time()
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert 0.25 <= loop.time() - started < 1.5
    assert len(events_of(body)) == 3
    error = error_event_of(body)
    assert error["code"] == "idle_timeout"
    assert b"[DONE]" not in body
    assert b.calls == 0
    await wait_for(a.requests[0].disconnected.is_set, timeout=2)  # the silent upstream was hung up on


async def test_total_timeout_mid_stream_ends_with_error_event(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"timeouts": {"total": 0.4, "idle": 5}})
    a.default = sse_reply(chat_chunks("m1", [str(n) for n in range(20)]), delay=0.1)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert resp.status == 200
    assert 2 <= len(events_of(body)) < 20
    assert error_event_of(body)["code"] == "upstream_error"
    assert b"[DONE]" not in body
    assert b.calls == 0


async def test_clean_end_without_done_is_reported_as_an_error(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply(chat_chunks("m1", ["Hel", "lo"]), done=False)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    body = await resp.read()
    assert len(events_of(body)) == len(chat_chunks("m1", ["Hel", "lo"])) + 1
    assert "[DONE]" in error_event_of(body)["message"]
    assert b"data: [DONE]" not in body
    assert b.calls == 0


async def test_final_done_without_blank_line_is_a_complete_stream(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    chunks = b"".join(sse_event(c) for c in chat_chunks("m1", ["Hel", "lo"]))
    a.default = stream_bytes([chunks, b"data: [DONE]"])

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    body = await resp.read()
    assert body == relabelled(chunks) + DONE
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0


async def test_connection_reset_after_done_is_a_completed_stream(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    events = [sse_event(chunk) for chunk in chat_chunks("m1", ["Hel", "lo"])]
    a.default = stream_bytes([*events, DONE], cut=True, pause=0.01)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()

    assert body.endswith(DONE)
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0


@pytest.mark.parametrize("upstream_state", ["streaming", "silent"])
async def test_client_disconnect_closes_the_upstream_promptly(make_upstream, make_proxy, upstream_state):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    words = [f"w{n} " for n in range(200)]
    if upstream_state == "streaming":
        a.default = sse_reply(chat_chunks("m1", words), delay=0.05)
    else:
        a.default = sse_reply(chat_chunks("m1", words), hang_after=2)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.status == 200
    assert await resp.content.readany()
    resp.close()  # the client goes away mid-answer
    loop = asyncio.get_running_loop()
    gone = loop.time()

    await wait_for(a.requests[0].disconnected.is_set, timeout=2)
    assert loop.time() - gone < 1.0
    await wait_for(lambda: proxy.gateway.health.get("a").in_flight == 0, timeout=1)
    assert proxy.gateway.health.get("a").breaker.consecutive_failures == 0  # the client's leaving is no provider fault


async def test_the_real_server_hangs_up_on_the_upstream_as_soon_as_the_client_leaves(make_upstream, serve):
    """`manaproxy serve` cancels the request of a client that leaves, before the first byte or mid-answer, even
    while it waits on the upstream; with the default timeouts nothing else would end the wait for a minute."""
    up = await make_upstream("up")
    up.queue(hang(), sse_reply(chat_chunks("m1", ["one", "two", "three"]), hang_after=2))
    process = await serve(build_config({"up": up}, {"mana/x": ["up/m1"]}))

    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(session.post(process.url + CHAT, json=chat(stream=True)))
        await wait_for(lambda: up.calls == 1)
        waiting.cancel()  # the client gives up before the first byte
        await asyncio.gather(waiting, return_exceptions=True)
        await wait_for(up.requests[0].disconnected.is_set, timeout=2)

        resp = await session.post(process.url + CHAT, json=chat(stream=True))
        assert await resp.content.readuntil(b"\n\n")  # committed: the relay waits on the silent upstream
        resp.close()  # the client goes away mid-answer
        await wait_for(up.requests[1].disconnected.is_set, timeout=2)


async def test_a_client_that_leaves_mid_stream_gets_the_upstream_torn_down_not_pooled(make_proxy, faulty_kind):
    """The provider contract (providers/base.py): `close(reuse=False)` tears the upstream connection down so
    the provider stops generating; only a stream that ended cleanly goes back to the pool."""
    providers = {"f": {"kind": faulty_kind, "base_url": "http://127.0.0.1:9/v1"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["f/stream-held"], "mana/y": ["f/stream"]}))
    provider = proxy.gateway.runtime.providers["f"]

    assert (await post_chat(proxy, chat("mana/y", stream=True))).endswith(DONE)
    await wait_for(lambda: provider.closed_with == [True])

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert await resp.content.readuntil(b"\n\n")  # committed: the relay waits on the provider
    resp.close()  # the client goes away mid-answer

    await wait_for(lambda: provider.closed_with == [True, False], timeout=2)


async def test_client_leaving_mid_stream_frees_the_concurrency_slot(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"max_concurrent": 1})
    a.queue(sse_reply(chat_chunks("m1", ["one", "two"]), hang_after=2))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert await resp.content.readline()  # committed: the relay is running
    resp.close()
    await wait_for(a.requests[0].disconnected.is_set)

    assert proxy.gateway.health.get("a").in_flight == 0
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert (await resp.read()).endswith(DONE)
    assert b.calls == 0


# -- unstreamed answers ---------------------------------------------------------------------------


async def test_unstreamed_json_gets_model_rewritten(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    answer = {**chat_completion("m1", "Hi there"), "x_vendor": {"model": "inner"}, "service_tier": None}
    a.default = json_reply(answer)

    resp = await proxy.client.post(CHAT, json=chat(stream=False))

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {**answer, "model": "a/m1"}


async def test_unstreamed_answer_to_a_stream_request_is_relayed_as_json(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = json_reply(chat_completion("m1"))

    resp = await proxy.client.post(CHAT, json=chat(stream=True))

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert (await resp.json())["model"] == "a/m1"


async def test_non_json_answer_is_relayed_untouched(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    audio = b"ID3\x04\x00\x00binary-audio\xff\xfb"
    a.default = raw_reply(audio, content_type="audio/mpeg")

    resp = await proxy.client.post("/v1/audio/speech", json={"model": "mana/x", "input": "hi", "voice": "v"})

    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/mpeg"
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert await resp.read() == audio


async def test_unstreamed_invalid_json_falls_back(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = raw_reply(b'{"id": "x", "model": "m1", "choi', content_type="application/json")
    b.default = status_reply(500)

    resp = await proxy.client.post(CHAT, json=chat(stream=False))

    # Neither answer is usable: a's is truncated JSON, b's is a 500.
    assert resp.status == 503
    assert b.calls == 1
