"""The official Node `openai` SDK pointed at manaproxy by base URL, as a Node app would use it.

Each test starts the proxy and its fake upstreams here, runs one small client script from tests/node/ in a
real Node process (the `node` fixture in conftest.py: the Node that tests/node/package.json installs, as
openai 7 needs Node >= 22) and asserts on the JSON line the script prints: what the SDK returned, or the
class, status, code and headers of what it threw.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from .fakes import (
    chat_chunks,
    chat_completion,
    embedding_reply,
    json_reply,
    responses_stream,
    sse_reply,
    status_reply,
    typed_events,
)
from .helpers import AUDIO, build_config, form_part

# -- answers ---------------------------------------------------------------------------------------------


async def test_chat_unstreamed_names_the_target_in_model_and_header(two, node):
    down, up, proxy = two
    up.queue(json_reply(chat_completion("m1", "Hi there")))

    out = await node("chat.mjs", baseURL=proxy.base_url, model="mana/x")

    assert "error" not in out, out
    assert (out["model"], out["text"]) == ("up/m1", "Hi there")
    assert out["headers"]["x-mana-llm-resolved"] == "up/m1"
    assert out["usage"]["total_tokens"] == 7
    assert (down.requests[0].json["model"], up.requests[0].json["model"]) == ("m0", "m1")
    sent = {name.lower(): value for name, value in up.requests[0].headers.items()}
    assert (sent["x-stainless-lang"], sent["x-stainless-runtime"]) == ("js", "node")  # the SDK's headers pass


async def test_chat_streamed_every_chunk_names_the_target(two, node):
    _, up, proxy = two
    up.queue(sse_reply(chat_chunks("m1", ["Hel", "lo"], usage=(3, 2))))

    out = await node(
        "chat.mjs",
        baseURL=proxy.base_url,
        model="mana/x",
        params={"stream": True, "stream_options": {"include_usage": True}},
    )

    assert "error" not in out, out
    assert out["text"] == "Hello"
    assert {chunk["model"] for chunk in out["received"]} == {"up/m1"}
    assert out["received"][-1]["usage"]["completion_tokens"] == 2
    assert out["headers"]["x-mana-llm-resolved"] == "up/m1"
    assert out["headers"]["content-type"].startswith("text/event-stream")
    assert up.requests[0].json["stream_options"] == {"include_usage": True}


async def test_a_responses_stream_ends_at_response_completed(one, node):
    a, proxy = one
    a.queue(responses_stream(typed_events("up-model")))

    out = await node("responses.mjs", baseURL=proxy.base_url, model="mana/x")

    assert "error" not in out, out
    types = [event["type"] for event in out["received"]]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert [event["delta"] for event in out["received"] if "delta" in event] == ["Hello", ", ", "world"]
    assert (out["model"], out["text"], out["status"]) == ("a/m1", "Hello, world", "completed")
    assert a.requests[0].path == "/v1/responses"
    assert a.requests[0].json["stream"] is True


async def test_embeddings_in_the_sdks_default_base64_are_decoded(two, node):
    _, up, proxy = two
    up.default = embedding_reply([[0.5, -0.25, 1.0], [2.0, 0.0, -1.5]])

    out = await node("embeddings.mjs", baseURL=proxy.base_url, model="mana/x", input=["one", "two"])

    assert "error" not in out, out
    assert out["vectors"] == [[0.5, -0.25, 1.0], [2.0, 0.0, -1.5]]
    assert out["model"] == "up/m1"
    assert out["headers"]["x-mana-llm-resolved"] == "up/m1"
    assert up.requests[0].path == "/v1/embeddings"
    assert up.requests[0].json["encoding_format"] == "base64"


async def test_a_transcription_uploaded_with_tofile_is_routed_and_arrives_whole(
    make_upstream, make_proxy, node, tmp_path
):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.queue(status_reply(503))
    b.queue(json_reply({"text": "hello there"}))
    aliases = {"mana/whisper": ["a/whisper-large-v3", "b/whisper-1"]}
    proxy = await make_proxy(build_config({"a": a, "b": b}, aliases, server={"max_body_bytes": 200_000}))
    audio = tmp_path / "speech.wav"
    audio.write_bytes(AUDIO)

    out = await node("transcription.mjs", baseURL=proxy.base_url, model="mana/whisper", path=str(audio))

    assert "error" not in out, out
    assert out["text"] == "hello there"
    assert out["headers"]["x-mana-llm-resolved"] == "b/whisper-1"
    sent = b.requests[0]
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert form_part(a.requests[0].body, "model") == b"whisper-large-v3"
    assert form_part(sent.body, "model") == b"whisper-1"
    assert form_part(sent.body, "file") == AUDIO
    assert form_part(sent.body, "language") == b"en"


# -- failures ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["chat", "responses"])
async def test_a_stream_cut_mid_way_throws_in_the_sdk(one, node, protocol):
    a, proxy = one
    if protocol == "chat":
        a.queue(sse_reply(chat_chunks("m1", ["Hel", "lo", " world"]), cut_after=2))
        out = await node("chat.mjs", baseURL=proxy.base_url, model="mana/x", params={"stream": True})
    else:
        a.queue(responses_stream(typed_events("up-model", cut_after=5), cut=True))
        out = await node("responses.mjs", baseURL=proxy.base_url, model="mana/x")

    assert out["received"]  # the answer had begun: the failure came after the commit point
    error = out["error"]
    assert (error["class"], error["status"]) == ("APIError", None)
    assert "a/m1" in error["message"]
    assert "failed mid-stream" in error["message"]
    if protocol == "responses":
        assert "response.completed" not in [event["type"] for event in out["received"]]


async def test_a_lone_404_is_not_found_and_not_retried(one, node):
    a, proxy = one
    a.default = status_reply(404, "The model `m1` does not exist")

    out = await node("chat.mjs", baseURL=proxy.base_url, model="mana/x", maxRetries=2)

    error = out["error"]
    assert (error["class"], error["status"]) == ("NotFoundError", 404)
    assert error["message"] == "404 a/m1: The model `m1` does not exist"
    assert error["headers"]["x-mana-llm-attempts"] == "a/m1=HTTP 404"
    assert a.calls == 1


async def test_429s_everywhere_are_a_rate_limit_error_with_retry_after(make_upstream, make_proxy, node):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(429, "slow down", headers={"Retry-After": "20"})
    b.default = status_reply(429, "slow down", headers={"Retry-After": "3"})  # under the 5 s cap
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}))

    out = await node("chat.mjs", baseURL=proxy.base_url, model="mana/x")

    error = out["error"]
    assert (error["class"], error["status"]) == ("RateLimitError", 429)
    assert error["headers"]["retry-after"] == "3"
    assert error["headers"]["x-mana-llm-attempts"] == "a/m1=HTTP 429, b/m2=HTTP 429"


async def test_the_sdk_waits_out_retry_after_and_its_retry_gets_through(one, node):
    a, proxy = one
    a.queue(status_reply(429, "slow down", headers={"Retry-After": "1"}), json_reply(chat_completion("m1", "at last")))

    started = time.monotonic()
    out = await node("chat.mjs", baseURL=proxy.base_url, model="mana/x", maxRetries=1)

    assert "error" not in out, out
    assert out["text"] == "at last"
    assert a.calls == 2
    assert time.monotonic() - started >= 1.0  # it waited as told, and manaproxy let the retry through


# -- the same call, direct and through manaproxy ----------------------------------------------------------

RATE_LIMIT_HEADERS = {
    "Retry-After": "2",
    "retry-after-ms": "1500",  # Azure OpenAI's; the SDK prefers it to Retry-After
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "120ms",
}
# What providers answer, as they word it: OpenAI's 400, 429 and 500, Ollama's 404 for a model not pulled.
PROVIDER_ERRORS: dict[int, tuple[dict[str, Any], dict[str, str]]] = {
    400: (
        {
            "message": "This model's maximum context length is 8192 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
        {},
    ),
    404: (
        {"message": 'model "m1" not found, try pulling it first', "type": "api_error", "param": None, "code": None},
        {},
    ),
    429: (
        {
            "message": "Rate limit reached for m1 on requests per min (RPM): Limit 500, Used 500.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        RATE_LIMIT_HEADERS,
    ),
    500: (
        {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        },
        {},
    ),
}
NOT_THE_PROVIDERS = ("date", "server", "content-length", "x-request-id", "x-upstream-request-id")


def as_seen(error: dict[str, Any]) -> dict[str, Any]:
    """What a client can tell of an error, less what differs between any two answers (date, length ...) and
    less what manaproxy adds by design (X-Mana-LLM-*, its request id)."""
    headers = {
        name: value
        for name, value in error["headers"].items()
        if name not in NOT_THE_PROVIDERS and not name.startswith("x-mana-llm-")
    }
    return {key: error[key] for key in ("class", "status", "code", "type", "param")} | {"headers": headers}


@pytest.mark.parametrize("status", [400, 404, 429, 500])
async def test_a_one_entry_chains_error_is_the_providers_own(one, node, status):
    a, proxy = one
    body, headers = PROVIDER_ERRORS[status]
    a.default = json_reply({"error": body}, status=status, headers=headers)

    direct, proxied = await asyncio.gather(
        node("chat.mjs", baseURL=a.base_url, model="m1"), node("chat.mjs", baseURL=proxy.base_url, model="mana/x")
    )

    assert as_seen(proxied["error"]) == as_seen(direct["error"])
    assert proxied["error"]["message"].endswith(body["message"])  # an `a/m1: ` prefix is documented


@pytest.mark.xfail(
    strict=True,
    reason="a known difference, documented in the README: X-Request-ID is manaproxy's own (the provider's is "
    "X-Upstream-Request-ID), so the SDK's `_request_id` / `err.requestID` is not the one to quote to a provider",
)
async def test_the_sdks_request_id_is_the_providers(one, node):
    a, proxy = one
    a.default = json_reply(chat_completion("m1"), headers={"x-request-id": "req_provider_1"})

    direct, proxied = await asyncio.gather(
        node("chat.mjs", baseURL=a.base_url, model="m1"), node("chat.mjs", baseURL=proxy.base_url, model="mana/x")
    )

    assert direct["requestID"] == "req_provider_1"
    assert proxied["requestID"] == "req_provider_1"
