"""Usage on every stream (issue 19, item 3): an openai-kind provider is asked for `include_usage` on a stream whose
client did not ask for it, the client gets exactly the stream it asked for, and the tokens are counted."""

from __future__ import annotations

import orjson

from .fakes import chat_completion, json_reply, refuses_stream_options, usage_stream
from .helpers import CHAT, build_config, chat, sse_data, value

WORDS = ["Hel", "lo", " there"]
USAGE_MEMBER = b'"stream_options":{"include_usage":true}'  # what is spliced in (manaproxy.body.USAGE_MEMBER)


async def _proxy(make_upstream, make_proxy):
    """Providers `inj` (stream_usage: inject, the default) and `pas` (passthrough), each its own fake upstream
    that honours include_usage as OpenAI does; aliases mana/i and mana/p."""
    inj = await make_upstream("inj")
    pas = await make_upstream("pas")
    inj.default = usage_stream("m1", WORDS)
    pas.default = usage_stream("m1", WORDS)
    providers = {"inj": inj, "pas": {"base_url": pas, "stream_usage": "passthrough"}}
    proxy = await make_proxy(build_config(providers, {"mana/i": ["inj/m1"], "mana/p": ["pas/m1"]}))
    return inj, pas, proxy


async def test_a_stream_without_usage_asked_is_counted_and_reaches_the_client_byte_for_byte(make_upstream, make_proxy):
    inj, pas, proxy = await _proxy(make_upstream, make_proxy)

    injected = await proxy.client.post(CHAT, json=chat("mana/i", stream=True))
    plain = await proxy.client.post(CHAT, json=chat("mana/p", stream=True))

    assert injected.status == plain.status == 200
    injected_body, plain_body = await injected.read(), await plain.read()
    # The same stream, byte for byte, but for the `model` each names (`inj/m1`, `pas/m1`).
    assert injected_body.replace(b'"inj/m1"', b'"pas/m1"') == plain_body
    assert b"usage" not in injected_body
    # The upstream was asked for usage, and answered it: the tokens are counted.
    assert inj.requests[0].json["stream_options"] == {"include_usage": True}
    assert "stream_options" not in pas.requests[0].json
    assert value(proxy, "mana_llm_tokens_total", provider="inj", model="m1", type="prompt") == 9
    assert value(proxy, "mana_llm_tokens_total", provider="inj", model="m1", type="completion") == 4
    assert (
        value(proxy, "mana_llm_client_tokens_total", client="anonymous", provider="inj", model="m1", type="prompt") == 9
    )
    assert value(proxy, "mana_llm_tokens_total", provider="pas", model="m1", type="prompt") == 0


async def test_the_request_goes_upstream_as_sent_with_only_the_member_added(make_upstream, make_proxy):
    inj, _pas, proxy = await _proxy(make_upstream, make_proxy)
    raw = b'  { "model" : "mana/i",\n "stream":true, "messages": [{"role": "user", "content": "hi"}], "n": 1.0e0 }'

    resp = await proxy.client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})

    assert resp.status == 200
    await resp.read()
    expected = b"  {" + USAGE_MEMBER + b"," + raw[3:].replace(b'"mana/i"', b'"m1"')
    assert inj.requests[0].body == expected


async def test_the_sdk_sees_no_usage_it_did_not_ask_for(make_upstream, make_proxy):
    inj, _pas, proxy = await _proxy(make_upstream, make_proxy)

    async with proxy.sdk() as client:
        stream = await client.chat.completions.create(
            model="mana/i", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "".join(WORDS)
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)
    assert len(chunks) == len(WORDS) + 2  # the role chunk, a chunk per word, the finish chunk
    assert inj.requests[0].json["stream_options"] == {"include_usage": True}
    assert value(proxy, "mana_llm_tokens_total", provider="inj", model="m1", type="completion") == 4


async def test_a_client_that_asks_for_usage_gets_it_as_the_upstream_sent_it(make_upstream, make_proxy):
    inj, _pas, proxy = await _proxy(make_upstream, make_proxy)

    resp = await proxy.client.post(CHAT, json=chat("mana/i", stream=True, stream_options={"include_usage": True}))

    body = await resp.read()
    usage = [data for data in sse_data(body.decode()) if isinstance(data, dict) and data.get("usage")]
    assert usage
    assert usage[0]["usage"]["prompt_tokens"] == 9
    assert b'"usage":null' in body  # every other chunk as the upstream wrote it
    assert inj.requests[0].json["stream_options"] == {"include_usage": True}
    assert value(proxy, "mana_llm_tokens_total", provider="inj", model="m1", type="prompt") == 9


async def test_stream_options_of_the_clients_own_go_as_they_are(make_upstream, make_proxy):
    inj, _pas, proxy = await _proxy(make_upstream, make_proxy)
    payload = chat("mana/i", stream=True, stream_options={"include_usage": False})

    resp = await proxy.client.post(CHAT, json=payload)

    assert resp.status == 200
    await resp.read()
    assert orjson.loads(inj.requests[0].body) == {**payload, "model": "m1"}


async def test_unstreamed_requests_are_sent_as_they_came(make_upstream, make_proxy):
    inj, _pas, proxy = await _proxy(make_upstream, make_proxy)
    inj.default = json_reply(chat_completion("m1"))
    resp = await proxy.client.post(CHAT, json=chat("mana/i"))

    assert resp.status == 200
    assert "stream_options" not in inj.requests[0].json


async def test_a_provider_that_refuses_stream_options_is_asked_again_without_it_until_reload(make_upstream, make_proxy):
    up = await make_upstream("old")
    up.default = refuses_stream_options(usage_stream("m1", WORDS))
    proxy = await make_proxy(build_config({"old": up}, {"mana/x": ["old/m1"]}))

    first = await proxy.client.post(CHAT, json=chat(stream=True))
    first_body = await first.read()
    second = await proxy.client.post(CHAT, json=chat(stream=True))
    await second.read()

    assert first.status == second.status == 200
    assert b"Hel" in first_body
    assert b"error" not in first_body
    # The first request: refused with the field, answered without it; the second goes without it at once.
    assert ["stream_options" in request.json for request in up.requests] == [True, False, False]
    assert value(proxy, "mana_llm_fallback_total", from_model="old/m1", to_model="", reason="http_400") == 0

    proxy.gateway.apply(proxy.config)  # a reload: the provider is asked again
    third = await proxy.client.post(CHAT, json=chat(stream=True))
    await third.read()
    assert ["stream_options" in request.json for request in up.requests] == [True, False, False, True, False]
