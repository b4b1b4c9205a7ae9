"""Server-sent events at the byte level: cut at event boundaries, rewrite `model`, write our own events.

Rule of this module: the relay never re-encodes an upstream event on the fast path. It finds the
top-level `"model": "..."` of each `data:` JSON line with one compiled regex and splices the new value
in; only an event whose top-level `model` comes after a nested value (llama.cpp sorts keys:
`{"choices": [...], ..., "model": ...}`) is parsed and re-encoded. Everything else — comments,
`[DONE]`, usage chunks, unknown fields, line endings — passes through byte for byte.

Only complete events are ever released (`EventBuffer.feed`), so an error event we append after an
upstream failure can never merge with half an upstream event.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_STRING = rb'"(?:[^"\\\n]|\\.)*"'
_SCALAR = rb"(?:" + _STRING + rb"|-?[0-9][0-9.eE+-]*|true|false|null)"
# `data: {` followed by any number of top-level scalar members, then the "model" member's string value.
_MODEL_VALUE = re.compile(
    rb"(?m)(^data: ?\{\s*(?:" + _STRING + rb"\s*:\s*" + _SCALAR + rb"\s*,\s*)*)(\"model\"\s*:\s*)(" + _STRING + rb")"
)
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_END = re.compile(rb"\r\n|\n|\r")

DONE_EVENT = b"data: [DONE]\n\n"
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventBuffer:
    """Accumulates upstream bytes and releases them cut after the last complete event."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """Add `chunk`; return every complete event now available (possibly b"")."""
        data = self._pending + chunk if self._pending else chunk
        # Fast path: providers end every write with a blank line.
        if data.endswith(_EVENT_ENDS):
            self._pending = b""
            return data
        end = _last_boundary(data)
        if end == 0:
            self._pending = data
            return b""
        self._pending = data[end:]
        return data[:end]

    def first_event(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Split off complete events up to and including the first `data:` event.

        Returns (released, rest): `released` is b"" while no data event is complete yet. `rest`
        holds complete events after it (not yet inspected); an incomplete tail stays pending.
        """
        data = self._pending + chunk if self._pending else chunk
        pos = 0
        while True:
            match = _BOUNDARY.search(data, pos)
            if match is None:
                self._pending = data
                return b"", b""
            event = data[pos : match.end()]
            pos = match.end()
            if is_data_event(event):
                self._pending = b""
                released, tail = data[:pos], data[pos:]
                return released, self.feed(tail) if tail else b""

    @property
    def pending(self) -> bytes:
        return self._pending


def _last_boundary(data: bytes) -> int:
    """Index just past the last event boundary in `data`, or 0."""
    best = 0
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        index = data.rfind(sep)
        if index != -1:
            best = max(best, index + len(sep))
    return best


def is_data_event(event: bytes) -> bool:
    """True when the event has a data field (comments and bare `event:`/`id:` lines do not count)."""
    return event.startswith(b"data:") or b"\ndata:" in event or b"\rdata:" in event


class ModelRewriter:
    """Rewrites the top-level `model` of every `data:` JSON line to one fixed value.

    A stream repeats the same `"model": "<upstream name>"` member in every chunk, so once the regex has
    found it, later chunks are fixed with one `bytes.replace` — as long as every `"model"` in the chunk is
    exactly that member; otherwise the regex runs again (and learns the new member).
    """

    __slots__ = ("_known", "_replacement", "_template", "_value", "_value_json")

    def __init__(self, model: str) -> None:
        self._value = model
        self._value_json = orjson.dumps(model)
        # A `re` template: escape backslashes so JSON escapes in the model name survive.
        self._template = b"\\g<1>\\g<2>" + self._value_json.replace(b"\\", b"\\\\")
        self._known: bytes | None = None  # the upstream's `"model": "..."` member, as last seen
        self._replacement = b""

    def rewrite(self, events: bytes) -> bytes:
        """Rewrite complete events; lines without a top-level `model` are left untouched."""
        members = events.count(b'"model"')
        if not members:
            return events
        known = self._known
        if known is not None and events.count(known) == members:
            return events.replace(known, self._replacement)
        rewritten, count = _MODEL_VALUE.subn(self._template, events)
        if count >= members:
            match = _MODEL_VALUE.search(events)
            if match is not None and match.group(3) != self._value_json:
                self._known = match.group(2) + match.group(3)
                self._replacement = match.group(2) + self._value_json
            return rewritten
        # Some data line carries a `model` the fast path did not reach: fix those lines one by one.
        return self._rewrite_slow(rewritten)

    def _rewrite_slow(self, events: bytes) -> bytes:
        lines = _LINE_END.split(events)
        separators = _LINE_END.findall(events)
        out: list[bytes] = []
        for index, line in enumerate(lines):
            if line.startswith(b"data:") and b'"model"' in line:
                line = self._rewrite_line(line)
            out.append(line)
            if index < len(separators):
                out.append(separators[index])
        return b"".join(out)

    def _rewrite_line(self, line: bytes) -> bytes:
        prefix = b"data: " if line.startswith(b"data: ") else b"data:"
        try:
            data = orjson.loads(line[len(prefix) :])
        except orjson.JSONDecodeError:
            return line
        if not isinstance(data, dict) or "model" not in data or data["model"] == self._value:
            return line
        data["model"] = self._value
        return prefix + orjson.dumps(data)


def data_json(event: bytes) -> Any:
    """Decode the JSON carried by an event's `data:` line(s); None when there is none."""
    parts = []
    for line in _LINE_END.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    try:
        return orjson.loads(b"\n".join(parts))
    except orjson.JSONDecodeError:
        return None


def error_of(event: bytes) -> dict[str, Any] | None:
    """The `error` object of an upstream error event (`data: {"error": ...}`), if it is one."""
    if b'"error"' not in event:
        return None
    data = data_json(event)
    if isinstance(data, dict) and data.get("error") is not None:
        error = data["error"]
        return error if isinstance(error, dict) else {"message": str(error)}
    return None


def usage_of(events: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a usage chunk among `events`, if one is there."""
    if b'"prompt_tokens"' not in events:
        return None
    found = None
    for line in _LINE_END.split(events):
        if line.startswith(b"data:") and b'"prompt_tokens"' in line:
            found = usage_from(data_json(line)) or found
    return found


def usage_from(data: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a decoded response object's `usage`."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        # Groq reports streamed usage under x_groq.usage
        extra = data.get("x_groq")
        usage = extra.get("usage") if isinstance(extra, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if isinstance(prompt, int) and isinstance(completion, int) and not isinstance(prompt, bool):
        return prompt, completion
    return None


_DONE_LINE = re.compile(rb"(?m)^data: ?\[DONE\]\r?$")


def has_done(events: bytes) -> bool:
    """True when a `data: [DONE]` line is among `events` (as a line of its own, not inside some text)."""
    return b"[DONE]" in events and _DONE_LINE.search(events) is not None


def data_event(data: Any) -> bytes:
    """One `data: <json>` event of our own."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


def error_event(message: str, *, error_type: str = "server_error", code: str | None = None) -> bytes:
    """Our own terminal error event, in the shape the OpenAI SDKs raise on."""
    return data_event({"error": {"message": message, "type": error_type, "param": None, "code": code}})
