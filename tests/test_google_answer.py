"""`providers/google/answer.py`: Gemini answers as OpenAI ones — finish reasons, streamed chunks (complete only
once every candidate has finished), embeddings as base64 little-endian float32."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
from google.genai import types

from manaproxy.providers.google import answer as google_answer

from .helpers import sse_data


@pytest.mark.parametrize(
    ("reason", "tools", "expected"),
    [
        ("STOP", False, "stop"),
        ("STOP", True, "tool_calls"),
        ("MAX_TOKENS", False, "length"),
        ("SAFETY", False, "content_filter"),
        ("RECITATION", False, "content_filter"),
        ("PROHIBITED_CONTENT", False, "content_filter"),
        ("MALFORMED_FUNCTION_CALL", False, "stop"),
        (None, False, None),
    ],
)
def test_finish_reason_table(reason, tools, expected):
    value = types.FinishReason(reason) if reason else None
    assert google_answer.finish_reason(value, tools) == expected


def test_base64_embeddings_are_little_endian_float32():
    response = types.EmbedContentResponse(embeddings=[types.ContentEmbedding(values=[1.5, -2.0])])
    body = google_answer.embeddings(response, model="m", as_base64=True)
    assert struct.unpack("<2f", base64.b64decode(body["data"][0]["embedding"])) == (1.5, -2.0)


def parsed_chunk(body: dict[str, Any]) -> types.GenerateContentResponse:
    return types.GenerateContentResponse.model_validate(body)


def test_chunk_translator_waits_for_every_candidate_to_finish():
    translator = google_answer.ChunkTranslator("chatcmpl-x", "m", 1, include_usage=True)
    first = translator.translate(parsed_chunk({"candidates": [{"index": 0, "content": {"parts": [{"text": "a"}]}}]}))
    events = sse_data(first.decode())
    assert events == [
        {
            "id": "chatcmpl-x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}, "finish_reason": None}],
        }
    ]
    translator.translate(
        parsed_chunk(
            {
                "candidates": [
                    {"index": 0, "finishReason": "STOP"},
                    {"index": 1, "content": {"parts": [{"text": "b"}]}},
                ]
            }
        )
    )
    assert not translator.complete  # candidate 1 is still going
    last = translator.translate(
        parsed_chunk(
            {
                "candidates": [{"index": 1, "finishReason": "MAX_TOKENS"}],
                "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 4, "totalTokenCount": 6},
            }
        )
    )
    assert [e["choices"][0]["finish_reason"] for e in sse_data(last.decode())] == ["length"]
    assert translator.complete
    tail = sse_data(translator.finish().decode())
    assert tail[0]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert tail[-1] == "[DONE]"
