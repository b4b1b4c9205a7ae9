"""The `google` provider kind end to end: the official openai SDK → manaproxy → google-genai → a fake Gemini.

`FakeGemini` (fakes.py) is a real aiohttp server on loopback speaking the Gemini REST API the SDK uses. It
records every request, so tests assert on the translated body the SDK really sent, and scripts replies,
Google-shaped errors, hangs and mid-stream cuts. The translation tables are unit-tested as pure functions in
test_google_request.py and test_google_answer.py.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import openai
import orjson
import pytest

from manaproxy.app import make_session
from manaproxy.body import parse_body
from manaproxy.config import ProviderConfig, ServerSettings, Target
from manaproxy.probe import probe_one
from manaproxy.providers import build_provider
from manaproxy.providers.base import Call, UpstreamFailure
from manaproxy.providers.google import GoogleProvider
from manaproxy.redact import Redactor

from .fakes import (
    GEMINI_KEY_INVALID_INFO,
    GEMINI_KEY_NOT_VALID,
    GEMINI_MODEL,
    FakeGemini,
    KeyRejectingGemini,
    chat_completion,
    gemini_answer,
    gemini_chunks,
    gemini_error_reply,
    gemini_stream,
    hang,
    json_reply,
    status_reply,
    stream_bytes,
    wait_for,
)
from .helpers import GOOGLE_KEY, Proxy, ask, build_config, chat, google_spec, sse_data, value

MODEL = GEMINI_MODEL


async def google_only(
    make_google_proxy: Any,
    gemini: FakeGemini,
    *,
    health: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    **extra: Any,
) -> Proxy:
    """mana/g = [google/MODEL] on the fake Gemini; `extra`: more settings of the google provider."""
    return await make_google_proxy(
        build_config(
            {"google": google_spec(gemini, **extra)}, {"mana/g": [f"google/{MODEL}"]}, health=health, server=server
        )
    )


def chat_call(*, stream: bool) -> Call:
    """A chat call to google/MODEL, as the proxy hands it to the provider."""
    body = parse_body(orjson.dumps({"messages": USER, "stream": stream}))
    return Call("/chat/completions", body, Target("google", MODEL), "rid-1", None)


USER = [{"role": "user", "content": "hi"}]


def pick(obj: dict[str, Any], camel: str) -> Any:
    """A field the SDK may spell in proto-JSON camelCase or snake_case (Google accepts both)."""
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)
    return obj[camel] if camel in obj else obj[snake]


# -- request translation ---------------------------------------------------------------------------------


async def test_request_is_translated_into_gemini_terms(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    png = base64.b64encode(b"\x89PNG fake").decode()
    payload = {
        "model": "mana/g",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No emojis."}]},
            {"role": "user", "content": "first"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
                ],
            },
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": "END",
        "n": 2,
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
    }
    resp = await proxy.client.post("/v1/chat/completions", json=payload)
    assert resp.status == 200, await resp.text()

    sent = gemini.last
    assert sent.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.headers["x-goog-api-key"] == GOOGLE_KEY
    body = sent.json
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "No emojis."}]}
    # Adjacent user messages merge into one turn; roles alternate user/model.
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    first = body["contents"][0]["parts"]
    assert first[:2] == [{"text": "first"}, {"text": "look"}]
    inline = first[2]["inlineData"]
    assert base64.b64decode(inline["data"]) == b"\x89PNG fake"
    assert pick(inline, "mimeType") == "image/png"
    assert pick(first[3]["fileData"], "fileUri") == "https://example.com/cat.webp"
    assert pick(first[3]["fileData"], "mimeType") == "image/webp"
    assert body["contents"][1] == {"role": "model", "parts": [{"text": "ok"}]}
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 50,
        "stopSequences": ["END"],
        "candidateCount": 2,
        "seed": 7,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.3,
    }
    assert "tools" not in body


async def test_max_completion_tokens_wins_and_json_modes(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    client = proxy.sdk()
    await client.chat.completions.create(
        model="mana/g",
        messages=USER,
        max_tokens=10,
        max_completion_tokens=20,
        response_format={"type": "json_object"},
    )
    config = gemini.last.json["generationConfig"]
    assert config["maxOutputTokens"] == 20
    assert config["responseMimeType"] == "application/json"
    assert "responseJsonSchema" not in config

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    await client.chat.completions.create(
        model="mana/g",
        messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
    )
    config = gemini.last.json["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseJsonSchema"] == schema
    await client.close()


# -- answers -----------------------------------------------------------------------------------------------


async def test_unstreamed_answer_through_openai_sdk(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = json_reply(gemini_answer("Bonjour", usage=(11, 4)))
    client = proxy.sdk()
    raw = await client.chat.completions.with_raw_response.create(model="mana/g", messages=USER)
    completion = raw.parse()
    await client.close()

    assert raw.headers["X-Mana-LLM-Resolved"] == f"google/{MODEL}"
    assert completion.object == "chat.completion"
    assert completion.model == f"google/{MODEL}"
    assert completion.choices[0].message.content == "Bonjour"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 4)
    assert completion.usage.total_tokens == 15
    [record] = [r for r in gemini.requests if "generateContent" in r.path]
    assert record.headers["X-Request-ID"] == raw.headers["X-Request-ID"]


async def test_streamed_answer_through_openai_sdk(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = gemini_stream(gemini_chunks(["Hel", "lo", " there"], usage=(5, 3)))
    client = proxy.sdk()
    stream = await client.chat.completions.create(
        model="mana/g", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    received = [chunk async for chunk in stream]
    await client.close()

    assert gemini.last.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    assert {c.model for c in received} == {f"google/{MODEL}"}
    assert {c.object for c in received} == {"chat.completion.chunk"}
    assert received[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Hello there"
    finishes = [c.choices[0].finish_reason for c in received if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert received[-1].choices == []
    assert (received[-1].usage.prompt_tokens, received[-1].usage.completion_tokens) == (5, 3)


async def test_a_streamed_answers_usage_reaches_the_token_metrics_and_the_log_line(make_google_proxy, gemini, caplog):
    caplog.set_level(logging.INFO, logger="manaproxy.request")
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = gemini_stream(gemini_chunks(["Hel", "lo"], usage=(6, 4)))
    body = {"model": "mana/g", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}

    resp = await proxy.client.post("/v1/chat/completions", json=body)
    await resp.read()

    assert value(proxy, "mana_llm_tokens_total", provider="google", model=MODEL, type="prompt") == 6
    assert value(proxy, "mana_llm_tokens_total", provider="google", model=MODEL, type="completion") == 4
    (line,) = [r.getMessage() for r in caplog.records if r.name == "manaproxy.request"]
    assert "prompt_tokens=6" in line
    assert "completion_tokens=4" in line


async def test_stream_without_include_usage_has_no_usage_chunk_and_ends_with_done(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = gemini_stream(gemini_chunks(["a", "b"]))
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    text = await resp.text()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert text.endswith("data: [DONE]\n\n")
    assert '"usage"' not in text


async def test_finish_reasons_and_thinking_usage(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    client = proxy.sdk()
    for gemini_reason, openai_reason in (("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("STOP", "stop")):
        gemini.default = json_reply(gemini_answer("x", finish=gemini_reason))
        completion = await client.chat.completions.create(model="mana/g", messages=USER)
        assert completion.choices[0].finish_reason == openai_reason, gemini_reason

    body = gemini_answer("x")
    body["usageMetadata"] = {
        "promptTokenCount": 10,
        "candidatesTokenCount": 5,
        "thoughtsTokenCount": 20,
        "totalTokenCount": 35,
    }
    gemini.default = json_reply(body)
    completion = await client.chat.completions.create(model="mana/g", messages=USER)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        10,
        25,
        35,
    )
    assert completion.usage.completion_tokens_details.reasoning_tokens == 20
    await client.close()


async def test_thought_parts_are_not_part_of_the_answer(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = json_reply(gemini_answer(parts=[{"text": "pondering...", "thought": True}, {"text": "42"}]))
    client = proxy.sdk()
    completion = await client.chat.completions.create(model="mana/g", messages=USER)
    await client.close()
    assert completion.choices[0].message.content == "42"


async def test_blocked_prompt_reads_as_content_filter(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4},
    }
    gemini.default = json_reply(blocked)
    client = proxy.sdk()
    completion = await client.chat.completions.create(model="mana/g", messages=USER)
    assert completion.choices[0].finish_reason == "content_filter"
    assert completion.choices[0].message.content is None

    gemini.default = gemini_stream([blocked])
    stream = await client.chat.completions.create(model="mana/g", messages=USER, stream=True)
    received = [chunk async for chunk in stream]
    await client.close()
    assert [c.choices[0].finish_reason for c in received] == ["content_filter"]


# -- tool calls --------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SIGNATURE = base64.b64encode(b"opaque-signature-bytes").decode()


def call_part(city: str, signature: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"functionCall": {"name": "get_weather", "args": {"city": city}}}
    if signature:
        part["thoughtSignature"] = signature
    return part


async def test_tools_and_tool_calls_round_trip(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = json_reply(gemini_answer(parts=[call_part("Paris", SIGNATURE), call_part("Oslo")]))
    client = proxy.sdk()
    completion = await client.chat.completions.create(
        model="mana/g", messages=USER, tools=[WEATHER_TOOL], tool_choice="required"
    )
    sent = gemini.last.json
    [declaration] = sent["tools"][0]["functionDeclarations"]
    assert declaration["name"] == "get_weather"
    assert declaration["description"] == "Weather for a city"
    schema = pick(declaration, "parametersJsonSchema")
    assert schema == WEATHER_TOOL["function"]["parameters"]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [orjson.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert len({c.id for c in calls}) == 2
    assert calls[0].model_extra["extra_content"] == {"google": {"thought_signature": SIGNATURE}}

    # The client answers both calls; Gemini gets one model turn and one turn with both responses.
    gemini.default = json_reply(gemini_answer("Sunny in both."))
    history = [
        *USER,
        completion.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "cold"},
    ]
    final = await client.chat.completions.create(
        model="mana/g",
        messages=history,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    await client.close()
    assert final.choices[0].message.content == "Sunny in both."
    sent = gemini.last.json
    assert [c["role"] for c in sent["contents"]] == ["user", "model", "user"]
    model_parts = sent["contents"][1]["parts"]
    assert model_parts[0]["functionCall"] == {"name": "get_weather", "args": {"city": "Paris"}}
    assert model_parts[0]["thoughtSignature"].rstrip("=") == SIGNATURE.rstrip("=")
    assert "thoughtSignature" not in model_parts[1]
    assert sent["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}},
        {"functionResponse": {"name": "get_weather", "response": {"result": "cold"}}},
    ]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


async def test_streamed_tool_calls(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = gemini_stream(
        [
            gemini_answer(parts=[{"text": "Let me check."}], finish=None, usage=None),
            gemini_answer(parts=[call_part("Rome")], usage=(9, 6)),
        ]
    )
    client = proxy.sdk()
    stream = await client.chat.completions.create(model="mana/g", messages=USER, tools=[WEATHER_TOOL], stream=True)
    received = [chunk async for chunk in stream]
    await client.close()
    deltas = [c.choices[0].delta for c in received if c.choices]
    [call] = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert call.index == 0
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Rome"}
    assert call.id
    assert [c.choices[0].finish_reason for c in received if c.choices][-1] == "tool_calls"
    assert "".join(d.content or "" for d in deltas) == "Let me check."


# -- embeddings ----------------------------------------------------------------------------------------------


async def test_embeddings_through_openai_sdk(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = json_reply({"embeddings": [{"values": [0.5, -0.25, 1.0]}, {"values": [0.0, 0.125, -1.0]}]})
    client = proxy.sdk()
    # The openai SDK asks for base64 by default and decodes it; the float form is checked raw below.
    result = await client.embeddings.create(model="google/text-embedding-004", input=["a", "b"], dimensions=3)
    assert [item.embedding for item in result.data] == [[0.5, -0.25, 1.0], [0.0, 0.125, -1.0]]
    assert result.model == "google/text-embedding-004"
    sent = gemini.last
    assert sent.path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    assert [r["content"]["parts"] for r in sent.json["requests"]] == [[{"text": "a"}], [{"text": "b"}]]
    assert {r["outputDimensionality"] for r in sent.json["requests"]} == {3}

    resp = await proxy.client.post(
        "/v1/embeddings", json={"model": "google/text-embedding-004", "input": "a", "encoding_format": "float"}
    )
    data = await resp.json()
    assert data["data"][0]["embedding"] == [0.5, -0.25, 1.0]
    await client.close()


# -- errors and fallback -------------------------------------------------------------------------------------


async def fallback_proxy(make_google_proxy, gemini, make_upstream, *, health=None, server=None) -> tuple[Proxy, Any]:
    """mana/g = [google/MODEL, backup/m2]; the backup answers "from backup"."""
    backup = await make_upstream("backup")
    backup.default = json_reply(chat_completion("backup-model", "from backup"))
    providers = {"google": google_spec(gemini), "backup": backup}
    proxy = await make_google_proxy(
        build_config(providers, {"mana/g": [f"google/{MODEL}", "backup/m2"]}, health=health, server=server)
    )
    return proxy, backup


@pytest.mark.parametrize(
    ("status", "status_name"),
    [
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (401, "UNAUTHENTICATED"),
        (404, "NOT_FOUND"),
        (400, "FAILED_PRECONDITION"),  # e.g. "User location is not supported": not the caller's fault
    ],
)
async def test_fallback_statuses_move_to_the_next_provider(
    make_google_proxy, gemini, make_upstream, status, status_name
):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream)
    gemini.default = gemini_error_reply(status, "nope", status_name)
    client = proxy.sdk()
    raw = await client.chat.completions.with_raw_response.create(model="mana/g", messages=USER)
    await client.close()
    assert raw.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert raw.parse().choices[0].message.content == "from backup"
    assert backup.calls == 1


async def test_rate_limit_retry_delay_keeps_google_out(make_google_proxy, gemini, make_upstream):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream)
    retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}
    gemini.default = gemini_error_reply(429, "quota", "RESOURCE_EXHAUSTED", details=[retry_info])
    client = proxy.sdk()
    await client.chat.completions.create(model="mana/g", messages=USER)
    await client.chat.completions.create(model="mana/g", messages=USER)
    await client.close()
    # The second request skipped google: its RetryInfo became a rate-limit window.
    assert len([r for r in gemini.requests if r.method == "POST"]) == 1
    assert backup.calls == 2
    assert proxy.gateway.health.skip_reason(proxy.config.providers["google"], MODEL) == "rate_limited"


async def test_caller_error_comes_back_as_openai_400(make_google_proxy, gemini, make_upstream):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream)
    gemini.default = gemini_error_reply(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
    client = proxy.sdk()
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="mana/g", messages=USER)
    await client.close()
    assert backup.calls == 0
    error = caught.value.body
    assert error["message"] == "Invalid JSON payload received."
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "INVALID_ARGUMENT"
    assert caught.value.response.headers["X-Mana-LLM-Resolved"] == f"google/{MODEL}"


REFUSED_MODELS = [f"{MODEL}?alt=json", "../../v1/files", f"{MODEL}/.."]  # the SDK raises "invalid model parameter"


@pytest.mark.parametrize("model", REFUSED_MODELS)
async def test_a_model_name_google_refuses_is_a_400(make_google_proxy, gemini, model):
    proxy = await google_only(make_google_proxy, gemini)
    resp = await proxy.client.post("/v1/chat/completions", json={"model": f"google/{model}", "messages": USER})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == "model"
    assert gemini.requests == []


async def test_a_client_cannot_open_googles_breaker_with_a_model_name_google_refuses(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini, health={"failure_threshold": 2})
    for model in REFUSED_MODELS[:2]:
        resp = await proxy.client.post("/v1/chat/completions", json={"model": f"google/{model}", "messages": USER})
        await resp.read()
    assert gemini.requests == []  # nothing reached Google: it cannot have failed
    assert proxy.gateway.health.breaker("google") == "closed"
    assert await ask(proxy, chat("mana/g")) == f"google/{MODEL}"


async def test_a_rejected_google_api_key_falls_back_and_counts_against_google(make_google_proxy, gemini, make_upstream):
    proxy, _backup = await fallback_proxy(make_google_proxy, gemini, make_upstream, health={"failure_threshold": 1})
    gemini.default = gemini_error_reply(400, GEMINI_KEY_NOT_VALID, "INVALID_ARGUMENT", details=GEMINI_KEY_INVALID_INFO)

    assert await ask(proxy, chat("mana/g")) == "backup/m2"
    assert proxy.gateway.health.breaker("google") == "open"


@pytest.mark.parametrize(
    ("messages", "extra", "param"),
    [
        ([{"role": "tool", "tool_call_id": "nope", "content": "x"}], {}, "messages[0].tool_call_id"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://[::1/cat.png"}}]}],
            {},
            "messages[0].content[0].image_url.url",
        ),
        ([{"role": "wizard", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "system", "content": "only a system prompt"}], {}, "messages"),
        (USER, {"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        (USER, {"logprobs": True}, "logprobs"),
        (USER, {"temperature": "warm"}, None),
    ],
)
async def test_untranslatable_input_is_a_400_without_calling_google(
    make_google_proxy, gemini, make_upstream, messages, extra, param
):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream)
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": messages, **extra})
    body = await resp.json()
    assert resp.status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert gemini.requests == []
    assert backup.calls == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chat_request_with_a_query_string_reaches_google(make_google_proxy, gemini, stream):
    proxy = await google_only(make_google_proxy, gemini)
    resp = await proxy.client.post(
        "/v1/chat/completions?api-version=2024-10-21", json={"model": "mana/g", "messages": USER, "stream": stream}
    )
    assert resp.status == 200, await resp.text()
    await resp.read()
    assert len(gemini.requests) == 1


async def test_other_paths_are_unsupported_and_fall_back(make_google_proxy, gemini, make_upstream):
    proxy, _backup = await fallback_proxy(make_google_proxy, gemini, make_upstream)
    resp = await proxy.client.post("/v1/completions", json={"model": "mana/g", "prompt": "hi"})
    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert gemini.requests == []


async def test_first_byte_timeout_falls_back(make_google_proxy, gemini, make_upstream):
    backup = await make_upstream("backup")
    backup.default = json_reply(chat_completion("m2", "late but there"))
    spec = google_spec(gemini, timeouts={"first_byte": 0.2, "total": 0.3})
    proxy = await make_google_proxy(
        build_config({"google": spec, "backup": backup}, {"mana/g": [f"google/{MODEL}", "backup/m2"]})
    )
    gemini.default = hang()
    for stream in (True, False):
        resp = await proxy.client.post(
            "/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": stream}
        )
        assert resp.status == 200
        assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
        await resp.read()
    assert backup.calls == 2
    assert len(gemini.requests) == 2


async def test_connection_refused_falls_back(make_google_proxy, make_upstream):
    backup = await make_upstream("backup")
    backup.default = json_reply(chat_completion("m2"))
    dead = {"kind": "google", "base_url": "http://127.0.0.1:9", "api_key": GOOGLE_KEY}
    proxy = await make_google_proxy(
        build_config({"google": dead, "backup": backup}, {"mana/g": [f"google/{MODEL}", "backup/m2"]})
    )
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER})
    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"


async def test_google_behind_a_failing_openai_provider(make_google_proxy, gemini, make_upstream):
    down = await make_upstream("down")
    down.default = status_reply(503)
    gemini.default = gemini_stream(gemini_chunks(["from ", "gemini"]))
    proxy = await make_google_proxy(
        build_config({"down": down, "google": google_spec(gemini)}, {"mana/x": ["down/m1", f"google/{MODEL}"]})
    )
    client = proxy.sdk()
    stream = await client.chat.completions.create(model="mana/x", messages=USER, stream=True)
    received = [chunk async for chunk in stream]
    await client.close()
    assert down.calls == 1
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "from gemini"
    assert {c.model for c in received} == {f"google/{MODEL}"}


# -- answer size bounds: server.max_response_bytes and server.max_event_bytes, as for the openai kind ----------

MIB = 1024 * 1024
SMALL_BOUNDS = {"max_response_bytes": MIB, "max_event_bytes": MIB}


async def test_an_unstreamed_answer_past_max_response_bytes_falls_back(make_google_proxy, gemini, make_upstream):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream, server=SMALL_BOUNDS)
    gemini.default = json_reply(gemini_answer("x" * (6 * MIB)))
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER})
    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert backup.calls == 1


async def test_a_first_event_past_max_event_bytes_falls_back(make_google_proxy, gemini, make_upstream):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream, server=SMALL_BOUNDS)
    gemini.default = gemini_stream([gemini_answer("x" * (3 * MIB))])
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert backup.calls == 1


async def test_an_event_past_max_event_bytes_mid_stream_ends_with_an_error_event(
    make_google_proxy, gemini, make_upstream
):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream, server=SMALL_BOUNDS)
    chunks = [gemini_answer("one ", finish=None, usage=None), gemini_answer("x" * (3 * MIB)), gemini_answer("end")]
    gemini.default = gemini_stream(chunks)
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    events = sse_data(await resp.text())
    assert resp.status == 200
    assert "[DONE]" not in events
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["one "]
    assert events[-1]["error"]["code"] == "upstream_error"
    assert f"larger than {MIB} bytes" in events[-1]["error"]["message"]
    assert backup.calls == 0  # committed: never another provider


async def test_many_small_events_past_max_event_bytes_in_all_pass(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini, server=SMALL_BOUNDS)
    words = [f"{index:04d}" + "y" * 1000 for index in range(2000)]  # 2 MiB in all, in events of 1 KiB
    gemini.default = gemini_stream(gemini_chunks(words))
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    events = sse_data(await resp.text())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "".join(words)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_too_large_fails_as_it_does_for_the_openai_kind(
    make_google_proxy, gemini, make_upstream, stream
):
    """A lone entry: google and openai kinds give the client the same status and error code."""
    google = await google_only(make_google_proxy, gemini, server=SMALL_BOUNDS)
    big = "x" * (3 * MIB)
    gemini.default = gemini_stream([gemini_answer(big)]) if stream else json_reply(gemini_answer(big))
    passthrough = await make_upstream("a")
    passthrough.default = (
        stream_bytes([b'data: {"model":"m1","choices":[{"delta":{"content":"' + big.encode() + b'"}}]}\n\n'])
        if stream
        else json_reply(chat_completion("m1", big))
    )
    openai_kind = await make_google_proxy(build_config({"a": passthrough}, {"mana/g": ["a/m1"]}, server=SMALL_BOUNDS))
    answers = []
    for proxy in (google, openai_kind):
        resp = await proxy.client.post(
            "/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": stream}
        )
        answers.append((resp.status, (await resp.json())["error"]["code"]))
    assert answers[0] == answers[1]
    assert answers[0][0] >= 500


# -- mid-stream failures -------------------------------------------------------------------------------------


async def test_mid_stream_cut_ends_with_error_event_and_no_done(make_google_proxy, gemini, make_upstream):
    proxy, backup = await fallback_proxy(make_google_proxy, gemini, make_upstream)
    gemini.default = gemini_stream(gemini_chunks(["one ", "two ", "three"]), cut_after=2)
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    events = sse_data(await resp.text())
    assert resp.status == 200
    assert "[DONE]" not in events
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "one two "
    assert events[-1]["error"]["code"] == "upstream_error"
    assert f"google/{MODEL}" in events[-1]["error"]["message"]
    assert backup.calls == 0  # committed: never another provider


async def test_stream_that_ends_without_finish_reason_is_not_complete(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = gemini_stream([gemini_answer("half", finish=None, usage=None)])
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    events = sse_data(await resp.text())
    assert "[DONE]" not in events
    assert "finish reason" in events[-1]["error"]["message"]


async def test_idle_timeout_mid_stream(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini, timeouts={"idle": 0.2})
    gemini.default = gemini_stream(gemini_chunks(["a", "b", "c"]), hang_after=1)
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    events = sse_data(await resp.text())
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "idle_timeout"
    await wait_for(lambda: gemini.last.disconnected.is_set())


async def test_client_disconnect_closes_the_gemini_stream(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    gemini.default = gemini_stream(gemini_chunks(["a", "b", "c"]), hang_after=1)
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": True})
    assert b"data: " in await resp.content.readany()
    resp.close()
    await wait_for(lambda: gemini.last.disconnected.is_set(), timeout=3)


# -- models, probes, secrets ---------------------------------------------------------------------------------


async def test_models_lists_servable_google_models(make_google_proxy, gemini):
    proxy = await google_only(make_google_proxy, gemini)
    resp = await proxy.client.get("/v1/models")
    ids = [item["id"] for item in (await resp.json())["data"]]
    assert "google/gemini-2.5-flash" in ids
    assert "google/text-embedding-004" in ids
    assert "google/imagen-4.0-generate-001" not in ids  # predict-only: not servable here
    listing = next(r for r in gemini.requests if r.method == "GET")
    assert listing.headers["x-goog-api-key"] == GOOGLE_KEY


@pytest.fixture
async def app_session():
    session = make_session()
    yield session
    await session.close()


async def test_probe_spends_no_tokens_and_reports_failures(gemini, app_session):
    config = ProviderConfig(name="google", kind="google", base_url=gemini.base_url, api_key=GOOGLE_KEY)
    provider = GoogleProvider(config, app_session)
    try:
        await provider.probe(1.0)
        assert [r.method for r in gemini.requests] == ["GET"]
        assert gemini.requests[0].path.startswith("/v1beta/models?")
        gemini.models_status = 403
        with pytest.raises(UpstreamFailure) as caught:
            await provider.probe(1.0)
        assert caught.value.status == 403
        assert caught.value.provider_fault
    finally:
        await provider.aclose()


async def test_a_probe_rejected_for_its_api_key_marks_google_unhealthy(make_google_proxy):
    fake = await KeyRejectingGemini().start()
    try:
        proxy = await make_google_proxy(
            build_config(
                {"google": google_spec(fake)}, {"mana/g": [f"google/{MODEL}"]}, health={"failure_threshold": 1}
            )
        )
        await probe_one(proxy.gateway, proxy.gateway.runtime.providers["google"], 1.0)
        view = (await (await proxy.client.get("/v1/health")).json())["providers"]["google"]
        assert view["status"] == "unhealthy", view  # what an operator reads in an outage
        assert GOOGLE_KEY not in str(view)
    finally:
        await fake.close()


async def test_api_key_never_reaches_responses_or_logs(make_google_proxy, gemini, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = await google_only(make_google_proxy, gemini)
    client = proxy.sdk()
    gemini.queue(
        gemini_error_reply(400, f"API key not valid: {GOOGLE_KEY}", "INVALID_ARGUMENT"),
        gemini_error_reply(403, f"key {GOOGLE_KEY} is suspended", "PERMISSION_DENIED"),
        gemini_stream(gemini_chunks(["x", "y"]), cut_after=1),
    )
    bodies = []
    for stream in (False, False, True):
        resp = await proxy.client.post(
            "/v1/chat/completions", json={"model": "mana/g", "messages": USER, "stream": stream}
        )
        bodies.append(await resp.text())
    health = await proxy.client.get("/v1/health")
    bodies.append(await health.text())
    await client.close()
    assert all(GOOGLE_KEY not in body for body in bodies), bodies
    assert GOOGLE_KEY not in caplog.text
    assert "GoogleProvider" in repr(proxy.gateway.runtime.providers["google"])
    assert GOOGLE_KEY not in repr(proxy.gateway.runtime.providers["google"])


async def test_unconfigured_google_provider_is_skipped(make_google_proxy, make_upstream):
    backup = await make_upstream("backup")
    backup.default = json_reply(chat_completion("m2"))
    spec = {"kind": "google", "api_key": "${GOOGLE_API_KEY}"}
    proxy = await make_google_proxy(
        build_config({"google": spec, "backup": backup}, {"mana/g": [f"google/{MODEL}", "backup/m2"]}), env={}
    )
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER})
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    provider = proxy.gateway.runtime.providers["google"]
    with pytest.raises(UpstreamFailure) as caught:
        await provider.send(chat_call(stream=False))
    assert caught.value.reason == "unconfigured"


async def test_aclose_leaves_the_shared_application_session_open(gemini, app_session):
    provider = GoogleProvider(
        ProviderConfig(name="g", kind="google", base_url=gemini.base_url, api_key=GOOGLE_KEY), app_session
    )
    answered = await provider.send(chat_call(stream=False))
    assert orjson.loads(answered.body)["choices"][0]["message"]["content"] == "Hello!"
    await provider.aclose()
    assert not app_session.closed


# -- connections and lifecycle -----------------------------------------------------------------------------


async def test_provider_on_the_application_session(gemini):
    session = make_session()
    provider = GoogleProvider(
        ProviderConfig(name="g", kind="google", base_url=gemini.base_url, api_key=GOOGLE_KEY), session
    )
    try:
        gemini.default = gemini_stream(gemini_chunks(["shared ", "pool"]))
        call = chat_call(stream=True)
        stream = await provider.send(call)
        body = stream.first + b"".join([events async for events in stream.events()])
        stream.close(reuse=True)
        assert b"data: [DONE]" in body
        # The application session hands bodies over undecoded, so the provider asks for none.
        assert gemini.last.headers["Accept-Encoding"] == "identity"
        assert provider._client._api_client._aiohttp_sessions == {}  # the SDK opened no session of its own
        await provider.aclose()
        assert not session.closed  # the application's to close
    finally:
        await session.close()


async def test_build_provider_hands_the_application_session_to_google(gemini):
    session = make_session()
    try:
        config = ProviderConfig(name="g", kind="google", base_url=gemini.base_url, api_key=GOOGLE_KEY)
        provider = build_provider(config, session, Redactor([config]), ServerSettings())
        assert isinstance(provider, GoogleProvider)
        assert provider.session is session
    finally:
        await session.close()


async def test_base_url_may_name_the_api_version(make_google_proxy, gemini):
    proxy = await make_google_proxy(
        build_config(
            {"google": google_spec(gemini, base_url=gemini.base_url + "/v1beta")}, {"mana/g": [f"google/{MODEL}"]}
        )
    )
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/g", "messages": USER})
    assert resp.status == 200
    assert gemini.last.path == f"/v1beta/models/{MODEL}:generateContent"


async def test_listing_an_unreachable_google_is_a_connect_failure(app_session):
    provider = GoogleProvider(
        ProviderConfig(name="g", kind="google", base_url="http://127.0.0.1:9", api_key=GOOGLE_KEY), app_session
    )
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await provider.list_models(1.0)
        assert caught.value.reason == "connect"
    finally:
        await provider.aclose()
