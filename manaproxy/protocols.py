"""What "complete" means for a streamed answer, by the protocol of its endpoint, and how ours ends in error.

Rule of this module: pure, and the only place that knows how each OpenAI protocol ends a stream:
- chat completions and legacy completions end at `data: [DONE]`;
- the Responses API (`/responses`) sends typed events and ends at `response.completed`,
  `response.incomplete` or `response.failed` — with no `[DONE]`;
- a stream of any other endpoint is complete when the upstream ends its body normally.
A stream that stops short of its protocol's end (a cut, an idle timeout, an upstream that just stops)
gets our error event, in the shape that protocol's clients raise on, and never looks complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from .sse import error_event, has_done

_RESPONSES_END = re.compile(
    rb'(?m)^event: ?response\.(?:completed|incomplete|failed)\r?$|"type"\s*:\s*"response\.(?:completed|incomplete|failed)"'
)
_RESPONSES_COMPLETED = re.compile(rb'(?m)^event: ?response\.completed\r?$|"type"\s*:\s*"response\.completed"')
_RESPONSES_END_WORDS = (b"response.completed", b"response.incomplete", b"response.failed")


def _error(message: str, code: str | None) -> dict[str, object]:
    return {"message": message, "type": "server_error", "param": None, "code": code}


@dataclass(frozen=True, slots=True)
class StreamProtocol:
    name: str
    end: str  # what marks the end, for messages: "[DONE]", "response.completed"
    ends_with_body: bool = False  # no end marker: a normal end of body completes the stream

    def ended_by(self, events: bytes) -> bool:
        """Whether the protocol's end is among `events` (complete SSE events)."""
        if self.name == "chat":
            return has_done(events)
        if self.name == "responses":
            return any(word in events for word in _RESPONSES_END_WORDS) and _RESPONSES_END.search(events) is not None
        return False

    def succeeded(self, events: bytes) -> bool:
        """Whether a complete stream (`events`, all of it) is a success worth replaying: for the Responses
        API only one whose last event is `response.completed` (not `incomplete` or `failed`); any other
        protocol's complete stream is."""
        if self.name != "responses":
            return True
        last = events.rstrip().rpartition(b"\n\n")[2]
        return _RESPONSES_COMPLETED.search(last) is not None

    def error_event(self, message: str, code: str | None = None) -> bytes:
        """Our terminal error event: what this protocol's clients (the openai SDKs) raise on."""
        if self.name == "responses":
            # The Responses API's own `error` event, with the `error` object the SDKs raise on as well.
            data = {"type": "error", "code": code, "message": message, "param": None, "error": _error(message, code)}
            return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"
        return error_event(message, code=code)


CHAT = StreamProtocol("chat", "[DONE]")
RESPONSES = StreamProtocol("responses", "response.completed")
OTHER = StreamProtocol("other", "the end of the body", ends_with_body=True)


def for_path(path: str) -> StreamProtocol:
    """The protocol of an upstream path (`/chat/completions?x=1`, `/responses` ...)."""
    endpoint = path.partition("?")[0].rstrip("/")
    if endpoint in ("/chat/completions", "/completions"):
        return CHAT
    if endpoint == "/responses":
        return RESPONSES
    return OTHER
