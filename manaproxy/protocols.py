"""What an OpenAI answer means: how each protocol ends a stream, how an answer reports its usage and its
errors, and how a stream of ours ends in error.

Rule of this module: pure, and the only place that knows the OpenAI answer semantics (`sse.py` knows SSE
framing and the `model` rewrite, nothing about what an event says):
- chat completions and legacy completions end at `data: [DONE]`;
- the Responses API (`/responses`) sends typed events and ends at `response.completed`,
  `response.incomplete` or `response.failed` — with no `[DONE]`;
- a stream of any other endpoint is complete when the upstream ends its body normally.
A stream that stops short of its protocol's end (a cut, an idle timeout, an upstream that just stops)
gets our error event, in the shape that protocol's clients raise on, and never looks complete. Each
`StreamProtocol` carries these differences as data (its end marker, how its error event is framed); its
methods read the fields and never branch on its name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .sse import LINE_END, data_event, data_json

DONE_EVENT = b"data: [DONE]\n\n"  # the end of a chat (or legacy completions) stream

_DONE_LINE = re.compile(rb"(?m)^data: ?\[DONE\]\r?$")
_RESPONSES_END = re.compile(
    rb'(?m)^event: ?response\.(?:completed|incomplete|failed)\r?$|"type"\s*:\s*"response\.(?:completed|incomplete|failed)"'
)
_RESPONSES_COMPLETED = re.compile(rb'(?m)^event: ?response\.completed\r?$|"type"\s*:\s*"response\.completed"')


# -- an answer's usage and errors ---------------------------------------------------------------------------


def error_object(message: str, *, error_type: str = "server_error", code: str | None = None) -> dict[str, Any]:
    """An OpenAI error object: what the SDKs raise on."""
    return {"message": message, "type": error_type, "param": None, "code": code}


def error_event(message: str, *, error_type: str = "server_error", code: str | None = None) -> bytes:
    """Our own terminal error event of a chat stream, in the shape the OpenAI SDKs raise on."""
    return data_event({"error": error_object(message, error_type=error_type, code=code)})


def error_of(event: bytes) -> dict[str, Any] | None:
    """The `error` object of an upstream error event (`data: {"error": ...}`), if it is one."""
    if b'"error"' not in event:
        return None
    data = data_json(event)
    if isinstance(data, dict) and data.get("error") is not None:
        error = data["error"]
        return error if isinstance(error, dict) else {"message": str(error)}
    return None


def carries_usage(events: bytes) -> bool:
    """Whether `events` may hold a usage object (the cheap check before `usage_of`, run on every chunk):
    one search that `"prompt_tokens"` and `"input_tokens"` both pass (and a few others, which
    `usage_of` then rules out)."""
    return b'_tokens"' in events


def usage_of(events: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a usage chunk among `events`, if one is there."""
    if not carries_usage(events):
        return None
    found = None
    for line in LINE_END.split(events):
        if line.startswith(b"data:") and (b'"prompt_tokens"' in line or b'"input_tokens"' in line):
            found = usage_from(data_json(line)) or found
    return found


def usage_from(data: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a decoded response object's `usage`."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    for holder in ("x_groq", "response"):  # Groq's streamed usage; the Responses API's final event
        if isinstance(usage, dict):
            break
        extra = data.get(holder)
        usage = extra.get("usage") if isinstance(extra, dict) else None
    if not isinstance(usage, dict):
        return None
    # Chat completions count prompt/completion tokens, the Responses API input/output tokens.
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if isinstance(prompt, int) and isinstance(completion, int) and not isinstance(prompt, bool):
        return prompt, completion
    return None


def has_done(events: bytes) -> bool:
    """True when a `data: [DONE]` line is among `events` (as a line of its own, not inside some text)."""
    return b"[DONE]" in events and _DONE_LINE.search(events) is not None


# -- how a stream ends ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamProtocol:
    """How the streams of one kind of endpoint end, and how ours end in error, as data."""

    name: str
    end: str  # what marks the end, for messages: "[DONE]", "response.completed"
    # The end marker: a line of complete events that `end_pattern` finds, once one of `end_words` (the cheap
    # substring check run on every chunk) is there. No words: the protocol has no end marker.
    end_words: tuple[bytes, ...] = ()
    end_pattern: re.Pattern[bytes] | None = None
    ends_with_body: bool = False  # no end marker: a normal end of body completes the stream
    # Our error event: `data: {"error": ...}`, or when named, a typed event `event: <name>` whose data carries
    # the error's fields at the top level (`type`, `code`, `message`, `param`) and the `error` object too.
    error_event_type: str | None = None
    # What a complete stream's last event must match to be a success worth replaying (the response cache);
    # None: any complete stream is one. The Responses API ends `incomplete` or `failed` too.
    success_pattern: re.Pattern[bytes] | None = None

    def ended_by(self, events: bytes) -> bool:
        """Whether the protocol's end is among `events` (complete SSE events)."""
        pattern = self.end_pattern
        return (
            pattern is not None
            and any(word in events for word in self.end_words)
            and pattern.search(events) is not None
        )

    def succeeded(self, events: bytes) -> bool:
        """Whether a complete stream (`events`, all of it) is a success worth replaying: for the Responses
        API only one whose last event is `response.completed` (not `incomplete` or `failed`); any other
        protocol's complete stream is."""
        if self.success_pattern is None:
            return True
        last = events.rstrip().rpartition(b"\n\n")[2]
        return self.success_pattern.search(last) is not None

    def error_event(self, message: str, code: str | None = None) -> bytes:
        """Our terminal error event: what this protocol's clients (the openai SDKs) raise on."""
        error = error_object(message, code=code)
        event_type = self.error_event_type
        if event_type is None:
            return data_event({"error": error})
        data = {"type": event_type, "code": code, "message": message, "param": None, "error": error}
        return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


CHAT = StreamProtocol("chat", "[DONE]", end_words=(b"[DONE]",), end_pattern=_DONE_LINE)
RESPONSES = StreamProtocol(
    "responses",
    "response.completed",
    end_words=(b"response.completed", b"response.incomplete", b"response.failed"),
    end_pattern=_RESPONSES_END,
    error_event_type="error",  # the Responses API's own `error` event
    success_pattern=_RESPONSES_COMPLETED,
)
OTHER = StreamProtocol("other", "the end of the body", ends_with_body=True)


def for_path(path: str) -> StreamProtocol:
    """The protocol of an upstream path (`/chat/completions?x=1`, `/responses` ...)."""
    endpoint = path.partition("?")[0].rstrip("/")
    if endpoint in ("/chat/completions", "/completions"):
        return CHAT
    if endpoint == "/responses":
        return RESPONSES
    return OTHER
