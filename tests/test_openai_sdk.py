"""The official openai SDK, sync and async, pointed at manaproxy by base URL — as an app would use it.

Sync calls run in a worker thread (`asyncio.to_thread`): the proxy lives on this test's event loop, so
a blocking call on the loop thread would wait forever for a server that cannot run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from .fakes import (
    chat_chunks,
    chat_completion,
    embedding_reply,
    json_reply,
    sse_reply,
    status_reply,
    text_completion,
    text_completion_chunks,
)
from .helpers import build_config

MESSAGES: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def sdk_upstreams(make_upstream):
    """`down` always answers 503; `up` lists two models."""
    down = await make_upstream("down")
    up = await make_upstream("up")
    down.default = status_reply(503)
    up.models = ["m1", "m-extra"]
    return down, up


@pytest.fixture
async def sdk_proxy(sdk_upstreams, make_proxy):
    """Alias mana/x = [down/m0, up/m1] (down always fails: every answer is a fallback); mana/dead = [down/m0]."""
    down, up = sdk_upstreams
    aliases = {
        "mana/x": {"description": "test alias", "chain": ["down/m0", "up/m1"]},
        "mana/dead": ["down/m0"],
    }
    proxy = await make_proxy(build_config({"down": down, "up": up}, aliases))
    return up, proxy


@pytest.fixture
async def aclient(sdk_proxy) -> Any:
    _up, proxy = sdk_proxy
    client = proxy.sdk(timeout=10)
    yield client
    await client.close()


@pytest.fixture
def client(sdk_proxy) -> Iterator[openai.OpenAI]:
    _up, proxy = sdk_proxy
    sync = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0, timeout=10)
    yield sync
    sync.close()


# -- chat completions -----------------------------------------------------------------------------


async def test_async_chat_unstreamed(sdk_proxy, aclient):
    up, _proxy = sdk_proxy
    up.default = json_reply(chat_completion("m1", "Hi there"))

    completion = await aclient.chat.completions.create(model="mana/x", messages=MESSAGES, temperature=0.1)

    assert completion.model == "up/m1"
    assert completion.choices[0].message.content == "Hi there"
    assert completion.usage is not None
    assert completion.usage.total_tokens == 7
    assert up.requests[0].json["model"] == "m1"
    assert up.requests[0].json["temperature"] == 0.1


async def test_async_chat_streamed_with_usage(sdk_upstreams, sdk_proxy, aclient):
    """The whole path once: alias → fallback → a stream through the SDK, with its usage chunk."""
    down, up = sdk_upstreams
    up.default = sse_reply(chat_chunks("m1", ["Hel", "lo"], usage=(3, 2)))

    stream = await aclient.chat.completions.create(
        model="mana/x", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert {c.model for c in chunks} == {"up/m1"}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2
    assert down.requests[0].json["model"] == "m0"
    assert up.requests[0].json["model"] == "m1"
    assert up.requests[0].json["stream_options"] == {"include_usage": True}


async def test_async_chat_with_raw_response_headers(sdk_proxy, aclient):
    up, _proxy = sdk_proxy
    up.default = json_reply(chat_completion("m1"))

    raw = await aclient.chat.completions.with_raw_response.create(model="mana/x", messages=MESSAGES)

    assert raw.headers["x-mana-llm-resolved"] == "up/m1"
    assert raw.headers["x-request-id"]
    assert raw.parse().model == "up/m1"


async def test_sync_chat_unstreamed(sdk_proxy, client):
    up, _proxy = sdk_proxy
    up.default = json_reply(chat_completion("m1", "sync"))

    completion = await asyncio.to_thread(client.chat.completions.create, model="mana/x", messages=MESSAGES)

    assert completion.model == "up/m1"
    assert completion.choices[0].message.content == "sync"


async def test_sync_chat_streamed(sdk_proxy, client):
    up, _proxy = sdk_proxy
    up.default = sse_reply(chat_chunks("m1", ["a", "b", "c"]), delay=0.01)

    def consume() -> list[Any]:
        return list(client.chat.completions.create(model="mana/x", messages=MESSAGES, stream=True))

    chunks = await asyncio.to_thread(consume)

    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abc"
    assert {c.model for c in chunks} == {"up/m1"}


async def test_provider_model_through_the_sdk(sdk_proxy, aclient):
    up, _proxy = sdk_proxy
    up.default = json_reply(chat_completion("vendor/m9"))

    completion = await aclient.chat.completions.create(model="up/vendor/m9", messages=MESSAGES)

    assert completion.model == "up/vendor/m9"
    assert up.requests[0].json["model"] == "vendor/m9"


# -- legacy completions and embeddings ------------------------------------------------------------


async def test_legacy_completions_unstreamed_and_streamed(sdk_proxy, aclient):
    up, _proxy = sdk_proxy
    up.queue(json_reply(text_completion("m1", "once upon")))
    up.queue(sse_reply(text_completion_chunks("m1", ["a ", "time"])))

    completion = await aclient.completions.create(model="mana/x", prompt="Tell me")
    stream = await aclient.completions.create(model="mana/x", prompt="Tell me", stream=True)
    pieces = [chunk async for chunk in stream]

    assert completion.model == "up/m1"
    assert completion.choices[0].text == "once upon"
    assert "".join(p.choices[0].text for p in pieces) == "a time"
    assert {p.model for p in pieces} == {"up/m1"}
    assert [r.path for r in up.requests] == ["/v1/completions", "/v1/completions"]


async def test_sync_legacy_completion(sdk_proxy, client):
    up, _proxy = sdk_proxy
    up.default = json_reply(text_completion("m1", "sync text"))

    completion = await asyncio.to_thread(client.completions.create, model="mana/x", prompt="p")

    assert completion.choices[0].text == "sync text"


async def test_embeddings_async_and_sync(sdk_proxy, aclient, client):
    up, _proxy = sdk_proxy
    up.default = embedding_reply([[0.5, -0.25, 1.0]])

    # The SDK asks for base64 by default and decodes it; ask for floats explicitly the second time.
    result = await aclient.embeddings.create(model="mana/x", input="hello")
    floats = await asyncio.to_thread(client.embeddings.create, model="mana/x", input=["hello"], encoding_format="float")

    assert result.model == "up/m1"
    assert result.data[0].embedding == [0.5, -0.25, 1.0]
    assert floats.data[0].embedding == [0.5, -0.25, 1.0]
    assert [r.path for r in up.requests] == ["/v1/embeddings", "/v1/embeddings"]
    assert up.requests[0].json["input"] == "hello"


# -- models ---------------------------------------------------------------------------------------


async def test_models_list_and_retrieve(aclient):
    page = await aclient.models.list()
    ids = {model.id for model in page.data}

    assert {"mana/x", "mana/dead", "up/m1", "up/m-extra"} <= ids
    alias = await aclient.models.retrieve("mana/x")
    assert alias.id == "mana/x"
    provider_model = await aclient.models.retrieve("up/m-extra")
    assert provider_model.id == "up/m-extra"
    assert provider_model.owned_by == "up"


async def test_sync_models_list(client):
    page = await asyncio.to_thread(client.models.list)

    assert "mana/x" in {model.id for model in page.data}


# -- errors ---------------------------------------------------------------------------------------


async def test_unknown_alias_is_not_found_error(aclient):
    with pytest.raises(openai.NotFoundError) as caught:
        await aclient.chat.completions.create(model="mana/nope", messages=MESSAGES)

    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


async def test_unknown_model_retrieve_is_not_found_error(aclient):
    with pytest.raises(openai.NotFoundError):
        await aclient.models.retrieve("mana/nope")


async def test_a_one_entry_chain_that_failed_is_its_providers_error(aclient):
    with pytest.raises(openai.InternalServerError) as caught:
        await aclient.chat.completions.create(model="mana/dead", messages=MESSAGES, stream=True)

    assert caught.value.status_code == 503
    assert caught.value.message.endswith("down/m0: upstream error")  # the provider's own message
    assert caught.value.response.headers["X-Mana-LLM-Attempts"] == "down/m0=HTTP 503"


async def test_unknown_provider_is_bad_request_error(aclient, client):
    with pytest.raises(openai.BadRequestError) as caught:
        await aclient.chat.completions.create(model="nope/m", messages=MESSAGES)
    assert caught.value.code == "unknown_provider"

    with pytest.raises(openai.BadRequestError):
        await asyncio.to_thread(client.chat.completions.create, model="nope/m", messages=MESSAGES)


async def test_upstream_caller_error_keeps_its_status_and_message(sdk_proxy, aclient):
    up, _proxy = sdk_proxy
    up.default = json_reply(
        {"error": {"message": "context too long", "type": "invalid_request_error", "param": None, "code": "ctx"}},
        status=400,
    )

    with pytest.raises(openai.BadRequestError) as caught:
        await aclient.chat.completions.create(model="mana/x", messages=MESSAGES)

    assert caught.value.code == "ctx"
    assert "context too long" in caught.value.message


async def test_wrong_key_is_authentication_error(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"up": up}, {"mana/x": ["up/m1"]}), api_keys=[b"test-client-key"])
    good = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="test-client-key", max_retries=0)
    bad = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="not-the-key", max_retries=0)
    sync_bad = openai.OpenAI(base_url=proxy.base_url, api_key="not-the-key", max_retries=0)
    try:
        assert (await good.chat.completions.create(model="mana/x", messages=MESSAGES)).model == "up/m1"
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="mana/x", messages=MESSAGES)
        assert caught.value.status_code == 401
        assert "not-the-key" not in str(caught.value.body)
        with pytest.raises(openai.AuthenticationError):
            await asyncio.to_thread(sync_bad.models.list)
    finally:
        await good.close()
        await bad.close()
        sync_bad.close()
    assert up.calls == 1


@pytest.mark.parametrize("ending", ["cut", "no-done"])
async def test_mid_stream_failure_raises_while_iterating_async(sdk_proxy, aclient, ending):
    up, _proxy = sdk_proxy
    chunks = chat_chunks("m1", ["Hel", "lo", " world"])
    up.default = sse_reply(chunks, cut_after=2) if ending == "cut" else sse_reply(chunks, done=False)

    stream = await aclient.chat.completions.create(model="mana/x", messages=MESSAGES, stream=True)
    received: list[Any] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as caught:
        await consume()

    assert received  # the answer had started: the failure came after the commit
    assert "up/m1" in caught.value.message


async def test_mid_stream_cut_raises_while_iterating_sync(sdk_proxy, client):
    up, _proxy = sdk_proxy
    up.default = sse_reply(chat_chunks("m1", ["Hel", "lo", " world"]), cut_after=2)
    received: list[Any] = []

    def consume() -> None:
        for chunk in client.chat.completions.create(model="mana/x", messages=MESSAGES, stream=True):
            received.append(chunk)

    with pytest.raises(openai.APIError):
        await asyncio.to_thread(consume)
    assert len(received) == 2
