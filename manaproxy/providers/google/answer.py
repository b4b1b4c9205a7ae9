"""Gemini answers → OpenAI objects: `chat.completion`, `chat.completion.chunk` events, embeddings lists.

Rule of this module: pure, like `request.py`. Gemini answers arrive as the SDK's
`GenerateContentResponse` objects and leave as client-ready OpenAI objects and SSE events, their `model`
already the resolved target, so nothing downstream parses or rewrites them again.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.genai import types

from ...protocols import DONE_EVENT
from ...sse import data_event

# Gemini finish reasons that mean "stopped by a content policy"; MAX_TOKENS is `length`; the rest `stop`.
_CONTENT_FILTER = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "LANGUAGE",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)


def finish_reason(reason: types.FinishReason | None, has_tool_calls: bool) -> str | None:
    """OpenAI's finish_reason for a Gemini candidate's."""
    if reason is None:
        return None
    name = reason.value
    if name == "MAX_TOKENS":
        return "length"
    if name in _CONTENT_FILTER:
        return "content_filter"
    return "tool_calls" if has_tool_calls else "stop"


def usage(metadata: types.GenerateContentResponseUsageMetadata | None) -> dict[str, Any] | None:
    """OpenAI usage from Gemini usage metadata; thinking tokens count as completion tokens, as OpenAI's do."""
    if metadata is None or metadata.prompt_token_count is None:
        return None
    prompt = metadata.prompt_token_count + (metadata.tool_use_prompt_token_count or 0)
    thoughts = metadata.thoughts_token_count or 0
    completion = (metadata.candidates_token_count or 0) + thoughts
    result: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": metadata.total_token_count or prompt + completion,
    }
    if thoughts:
        result["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    if metadata.cached_content_token_count:
        result["prompt_tokens_details"] = {"cached_tokens": metadata.cached_content_token_count}
    return result


def usage_counts(counted: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an OpenAI usage object made by `usage`."""
    return None if counted is None else (counted["prompt_tokens"], counted["completion_tokens"])


def _call_id(completion_id: str, index: int, n: int) -> str:
    return f"call_{completion_id.removeprefix('chatcmpl-')}_{index}_{n}"


def _tool_call(part: types.Part, call_id: str, index: int | None = None) -> dict[str, Any]:
    call = part.function_call
    assert call is not None
    result: dict[str, Any] = {
        "id": call.id or call_id,
        "type": "function",
        "function": {"name": call.name or "", "arguments": orjson.dumps(call.args or {}).decode()},
    }
    if index is not None:
        result = {"index": index, **result}
    if part.thought_signature:
        # Where Google's own OpenAI-compatible endpoint puts it; clients that keep it get it back to us.
        signature = base64.b64encode(part.thought_signature).decode()
        result["extra_content"] = {"google": {"thought_signature": signature}}
    return result


def _split_parts(parts: Iterable[types.Part] | None) -> tuple[str, list[types.Part]]:
    """(answer text, function-call parts); thought summaries are not part of the answer."""
    texts = []
    calls = []
    for part in parts or ():
        if part.function_call is not None:
            calls.append(part)
        elif part.text and not part.thought:
            texts.append(part.text)
    return "".join(texts), calls


def _blocked(response: types.GenerateContentResponse) -> bool:
    feedback = response.prompt_feedback
    return not response.candidates and feedback is not None and feedback.block_reason is not None


def chat_completion(
    response: types.GenerateContentResponse, *, completion_id: str, model: str, created: int
) -> dict[str, Any]:
    """An OpenAI `chat.completion` for an unstreamed Gemini answer."""
    choices = []
    for position, candidate in enumerate(response.candidates or ()):
        index = candidate.index if candidate.index is not None else position
        text, calls = _split_parts(candidate.content.parts if candidate.content else None)
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = [
                _tool_call(part, _call_id(completion_id, index, n)) for n, part in enumerate(calls)
            ]
        choices.append(
            {
                "index": index,
                "message": message,
                "finish_reason": finish_reason(candidate.finish_reason, bool(calls)) or "stop",
            }
        )
    if not choices and _blocked(response):
        choices.append(
            {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}
        )
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": sorted(choices, key=lambda choice: choice["index"]),
    }
    counted = usage(response.usage_metadata)
    if counted is not None:
        body["usage"] = counted
    return body


@dataclass(slots=True)
class ChunkTranslator:
    """Turns a Gemini stream into OpenAI `chat.completion.chunk` events, one Gemini chunk at a time.

    `complete` tells whether the stream reached its end (a finish reason for every candidate seen, or a
    blocked prompt); only then does `finish()` give the usage chunk and `[DONE]`.
    """

    completion_id: str
    model: str
    created: int
    include_usage: bool
    _started: set[int] = field(default_factory=set)
    _finished: set[int] = field(default_factory=set)
    _tool_calls: dict[int, int] = field(default_factory=dict)  # candidate index → tool calls so far
    _usage: dict[str, Any] | None = None
    _blocked: bool = False

    @property
    def usage(self) -> tuple[int, int] | None:
        """The answer's tokens as far as Gemini has reported them."""
        return usage_counts(self._usage)

    @property
    def complete(self) -> bool:
        return self._blocked or (bool(self._started) and self._started <= self._finished)

    def _chunk(self, index: int, delta: dict[str, Any], reason: str | None = None) -> bytes:
        return data_event(
            {
                "id": self.completion_id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": index, "delta": delta, "finish_reason": reason}],
            }
        )

    def translate(self, response: types.GenerateContentResponse) -> bytes:
        """The events for one Gemini chunk; the first call always yields at least the role event."""
        out = []
        counted = usage(response.usage_metadata)
        if counted is not None:
            self._usage = counted  # Gemini reports running totals: the last one is the answer's
        candidates = response.candidates or ()
        if not candidates and not self._started:
            self._started.add(0)
            if _blocked(response):
                self._blocked = True
                self._finished.add(0)
                out.append(self._chunk(0, {"role": "assistant", "content": ""}, "content_filter"))
            else:
                out.append(self._chunk(0, {"role": "assistant", "content": ""}))
        for position, candidate in enumerate(candidates):
            index = candidate.index if candidate.index is not None else position
            text, calls = _split_parts(candidate.content.parts if candidate.content else None)
            delta: dict[str, Any] = {}
            if index not in self._started:
                self._started.add(index)
                delta = {"role": "assistant", "content": ""}
            if text:
                delta["content"] = text
            if calls:
                first = self._tool_calls.get(index, 0)
                delta["tool_calls"] = [
                    _tool_call(part, _call_id(self.completion_id, index, first + n), first + n)
                    for n, part in enumerate(calls)
                ]
                self._tool_calls[index] = first + len(calls)
            if delta:
                out.append(self._chunk(index, delta))
            reason = finish_reason(candidate.finish_reason, bool(self._tool_calls.get(index)))
            if reason is not None and index not in self._finished:
                self._finished.add(index)
                out.append(self._chunk(index, {}, reason))
        return b"".join(out)

    def finish(self) -> bytes:
        """The usage chunk (when asked for) and `[DONE]`."""
        tail = b""
        if self.include_usage and self._usage is not None:
            tail = data_event(
                {
                    "id": self.completion_id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": self._usage,
                }
            )
        return tail + DONE_EVENT


def embeddings(response: types.EmbedContentResponse, *, model: str, as_base64: bool) -> dict[str, Any]:
    """An OpenAI embeddings list; vectors as float lists or base64 little-endian float32, as OpenAI does."""
    data = []
    for index, item in enumerate(response.embeddings or ()):
        values = item.values or []
        vector: Any = values
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {"object": "list", "data": data, "model": model}
