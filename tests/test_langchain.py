"""LangChain (`langchain-openai`) pointed at manaproxy by `base_url`, as a LangChain app would use it:
`ChatOpenAI` (invoke, stream, a tool call round trip, errors) and `OpenAIEmbeddings`.

Nothing here may reach past loopback: `no_network` refuses and records any other host name lookup, so a
library that would fetch something at run time (tiktoken's encodings, LangSmith tracing) fails the test
rather than pass on a machine that happens to be online. Embeddings are built with
`check_embedding_ctx_length=False`: the default tokenizes with tiktoken first, which downloads its encoding.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import openai
import pytest
from langchain_core.exceptions import ContextOverflowError, ModelNotFoundError, ModelRateLimitError
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from .fakes import (
    chat_chunks,
    chat_completion,
    embedding_reply,
    json_reply,
    sse_reply,
    status_reply,
    tool_call_chunks,
    tool_call_completion,
)
from .helpers import build_config

LOOPBACK = {"127.0.0.1", "::1", "localhost", b"127.0.0.1", b"localhost"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Only loopback names resolve; any other lookup raises and is recorded, and the test fails."""
    resolve = socket.getaddrinfo
    refused: list[Any] = []

    def loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in LOOPBACK:
            refused.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"no network in tests: {host}")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    yield
    assert refused == [], f"LangChain tried to reach {refused}"


@pytest.fixture
async def http():
    """The HTTP clients LangChain hands the openai SDK. Its default ones are cached for the process and
    never closed, which would leave sockets of this test's loop behind; these are closed with the test."""
    sync, asynchronous = openai.DefaultHttpxClient(), openai.DefaultAsyncHttpxClient()
    yield {"http_client": sync, "http_async_client": asynchronous}
    sync.close()
    await asynchronous.aclose()


def chat_model(proxy, http, model: str = "mana/x", **extra: Any) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=proxy.base_url, api_key="unused", max_retries=0, **http, **extra)


# -- answers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_invoke_names_the_resolved_target(two, http, mode):
    _down, up, proxy = two
    up.queue(json_reply(chat_completion("m1", "Hi there")))
    llm = chat_model(proxy, http)

    message = await llm.ainvoke("hi") if mode == "async" else await asyncio.to_thread(llm.invoke, "hi")

    assert message.content == "Hi there"
    assert message.response_metadata["model_name"] == "up/m1"
    assert message.usage_metadata is not None
    assert message.usage_metadata["total_tokens"] == 7
    assert up.requests[0].json["model"] == "m1"


async def test_streamed_chunks_concatenate_to_the_answer(two, http):
    _down, up, proxy = two
    up.queue(sse_reply(chat_chunks("m1", ["Once", " upon", " a time"], usage=(4, 3))))

    chunks = [chunk async for chunk in chat_model(proxy, http).astream("tell me")]

    assert "".join(chunk.content for chunk in chunks) == "Once upon a time"
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.content == "Once upon a time"
    assert whole.response_metadata["model_name"] == "up/m1"
    assert whole.response_metadata["finish_reason"] == "stop"
    assert up.requests[0].json["stream"] is True


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_call_round_trip(two, http, stream):
    _down, up, proxy = two
    arguments = '{"city": "Paris"}'
    first = (
        sse_reply(tool_call_chunks("m1", "get_weather", arguments))
        if stream
        else json_reply(tool_call_completion("m1", "get_weather", arguments))
    )
    up.queue(first, json_reply(chat_completion("m1", "It is sunny in Paris.")))
    llm = chat_model(proxy, http).bind_tools([get_weather])
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]

    if stream:
        chunks = [chunk async for chunk in llm.astream(messages)]
        asked = chunks[0]
        for chunk in chunks[1:]:
            asked += chunk
    else:
        asked = await llm.ainvoke(messages)
    (call,) = asked.tool_calls
    messages += [asked, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    answer = await llm.ainvoke(messages)

    assert (call["name"], call["args"], call["id"]) == ("get_weather", {"city": "Paris"}, "call_1")
    assert asked.response_metadata["model_name"] == "up/m1"
    assert answer.content == "It is sunny in Paris."
    first_sent, second_sent = up.requests[0].json, up.requests[1].json
    assert first_sent["tools"][0]["function"]["name"] == "get_weather"
    assert [message["role"] for message in second_sent["messages"]] == ["user", "assistant", "tool"]
    assert second_sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": arguments}
    assert (second_sent["messages"][2]["tool_call_id"], second_sent["messages"][2]["content"]) == (
        "call_1",
        "sunny in Paris",
    )
    assert first_sent["model"] == second_sent["model"] == "m1"


async def test_embeddings(two, http):
    _down, up, proxy = two
    up.default = embedding_reply([[0.5, -0.25, 1.0], [2.0, 0.0, -1.5]])
    embeddings = OpenAIEmbeddings(
        model="mana/x",
        base_url=proxy.base_url,
        api_key="unused",
        max_retries=0,
        check_embedding_ctx_length=False,
        **http,
    )

    vectors = await embeddings.aembed_documents(["one", "two"])
    query = await asyncio.to_thread(embeddings.embed_query, "three")

    assert vectors == [[0.5, -0.25, 1.0], [2.0, 0.0, -1.5]]
    assert query == [0.5, -0.25, 1.0]
    sent = up.requests[0].json
    assert (sent["model"], sent["input"], sent["encoding_format"]) == ("m1", ["one", "two"], "base64")


# -- failures ----------------------------------------------------------------------------------------------


async def test_an_unknown_alias_is_openais_not_found_and_langchains_model_not_found(two, http):
    _down, _up, proxy = two

    with pytest.raises(openai.NotFoundError) as caught:
        await chat_model(proxy, http, model="mana/nope").ainvoke("hi")

    assert isinstance(caught.value, ModelNotFoundError)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


# A prompt too long for the model, as two providers word it. LangChain makes it a ContextOverflowError (which
# its agents trim history on) by the words of the error: "prompt is too long" in the message, or
# "context_length_exceeded" in `str(error)` -- which openai>=3 no longer puts there, so OpenAI's own wording
# is an OpenAIInvalidRequestError even directly. Either way the class must be what a direct call gives.
OVERFLOWS = {
    "openai": {
        "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    },
    "anthropic": {"message": "prompt is too long: 208000 tokens > 200000 maximum", "type": "invalid_request_error"},
}


async def raised(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_providers_context_overflow_is_classed_as_it_is_directly(two, http, provider):
    _down, up, proxy = two
    up.default = json_reply({"error": OVERFLOWS[provider]}, status=400)
    direct_llm = ChatOpenAI(model="m1", base_url=up.base_url, api_key="unused", max_retries=0, **http)

    direct = await raised(direct_llm.ainvoke("a very long prompt"))
    proxied = await raised(chat_model(proxy, http).ainvoke("a very long prompt"))

    assert type(proxied) is type(direct)
    assert (proxied.status_code, proxied.code, proxied.message) == (direct.status_code, direct.code, direct.message)
    assert isinstance(proxied, ContextOverflowError) == (provider == "anthropic")


async def test_429s_everywhere_are_a_rate_limit_error_with_retry_after(make_upstream, make_proxy, http):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(429, "slow down", headers={"Retry-After": "20"})
    b.default = status_reply(429, "slow down", headers={"Retry-After": "3"})  # under the 5 s cap
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}))

    with pytest.raises(openai.RateLimitError) as caught:
        await chat_model(proxy, http).ainvoke("hi")

    assert isinstance(caught.value, ModelRateLimitError)
    assert caught.value.response.headers["Retry-After"] == "3"


async def test_a_stream_cut_mid_way_raises(two, http):
    _down, up, proxy = two
    up.queue(sse_reply(chat_chunks("m1", ["Hel", "lo", " world"]), cut_after=2))
    received: list[Any] = []

    async def consume() -> None:
        async for chunk in chat_model(proxy, http).astream("hi"):
            received.append(chunk)

    with pytest.raises(openai.APIError, match="up/m1 failed mid-stream"):
        await consume()
    assert "".join(chunk.content for chunk in received) == "Hel"  # the answer had begun
