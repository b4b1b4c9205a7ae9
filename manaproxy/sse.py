"""Server-sent events at the byte level: cut at event boundaries, rewrite `model`, frame our own events.

Rule of this module: SSE framing and the `model` rewrite only; what an event *says* (an end marker,
usage, an error) is `protocols.py`'s. The relay never re-encodes an upstream event on the fast path, and
its cost is linear in the bytes relayed. `ModelRewriter` finds the top-level `"model": "..."` of each
`data:` JSON line with an anchored, backtracking-free regex that reads only the members before it, and
splices the new value in; later chunks repeating the same member get one `bytes.replace`. Only an event
whose top-level `model` comes after a nested value (llama.cpp sorts keys: `{"choices": [...], ...,
"model": ...}`) is parsed and re-encoded. Everything else — comments, `[DONE]`, usage chunks, unknown
fields, line endings — passes through byte for byte.

Only complete events are ever released (`EventBuffer`), so an error event we append after an upstream
failure can never merge with half an upstream event; each byte fed is searched for a boundary once.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# A JSON string, unrolled and possessive: one pass, no backtracking, no stack growth on a long string.
_STRING = rb'"[^"\\\n]*+(?:\\.[^"\\\n]*+)*+"'
_SCALAR = rb"(?:" + _STRING + rb"|-?[0-9][0-9.eE+-]*+|true|false|null)"
# At the start of a line: `data: {`, any number of other top-level scalar members, then the "model" member.
_MODEL_AT = re.compile(
    rb'data: ?\{\s*+(?:(?!"model")'
    + _STRING
    + rb"\s*+:\s*+"
    + _SCALAR
    + rb"\s*+,\s*+)*+(\"model\"\s*+:\s*+)("
    + _STRING
    + rb")"
)
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
LINE_END = re.compile(rb"\r\n|\n|\r")  # a line ending of SSE: LF, CRLF or CR

_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")  # what ends an event (the blank line, in any line ending)


def _last_boundary(data: bytes | bytearray, start: int = 0) -> int:
    """Index just past the last event boundary in `data[start:]`, or 0."""
    best = 0
    for sep in _EVENT_ENDS:
        index = data.rfind(sep, start)
        if index != -1:
            best = max(best, index + len(sep))
    return best


class EventBuffer:
    """Accumulates upstream bytes and releases them cut after the last complete event.

    Linear in what it is fed: a chunk that ends on a boundary (what providers send) passes through as
    it is; otherwise only the new bytes (and the 3 before them, for a boundary split across chunks) are
    searched, and a long event grows one buffer in place.
    """

    __slots__ = ("_event_start", "_pending", "_scanned")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._scanned = 0  # `first_event`: where the next boundary search starts
        self._event_start = 0  # `first_event`: where the event being read starts

    def feed(self, chunk: bytes) -> bytes:
        """Add `chunk`; return every complete event now available (possibly b"")."""
        pending = self._pending
        if not pending:
            if chunk.endswith(_EVENT_ENDS):  # the fast path
                return chunk
            end = _last_boundary(chunk)
            pending += chunk[end:]
            return chunk[:end]
        searched_from = max(0, len(pending) - 3)
        pending += chunk
        end = _last_boundary(pending, searched_from)
        if end == 0:
            return b""
        released = bytes(pending[:end])
        del pending[:end]  # from the front of a bytearray: no copy of what stays
        return released

    def first_event(self, chunk: bytes) -> tuple[bytes, bytes]:
        """Split off complete events up to and including the first `data:` event.

        Returns (released, rest): `released` is b"" while no data event is complete yet. `rest`
        holds complete events after it (not yet inspected); an incomplete tail stays pending.
        """
        pending = self._pending
        pending += chunk
        while True:
            match = _BOUNDARY.search(pending, self._scanned)
            if match is None:
                self._scanned = max(self._event_start, len(pending) - 3)
                return b"", b""
            event = pending[self._event_start : match.end()]
            self._event_start = self._scanned = match.end()
            if is_data_event(event):
                released, tail = bytes(pending[: match.end()]), bytes(pending[match.end() :])
                pending.clear()
                self._event_start = self._scanned = 0
                return released, self.feed(tail) if tail else b""

    @property
    def pending(self) -> bytes:
        """The bytes of the incomplete event held back."""
        return bytes(self._pending)

    @property
    def pending_size(self) -> int:
        return len(self._pending)


def is_data_event(event: bytes | bytearray) -> bool:
    """True when the event has a data field (comments and bare `event:`/`id:` lines do not count)."""
    return event.startswith(b"data:") or b"\ndata:" in event or b"\rdata:" in event


class ModelRewriter:
    """Rewrites the top-level `model` of every `data:` JSON line to one fixed value.

    A stream repeats the same `"model": "<upstream name>"` member in every chunk, so once the regex has
    found it, later chunks are fixed with one `bytes.replace` — as long as every `"model"` in the chunk is
    exactly that member; otherwise each data line is matched again (and the member learned anew).
    """

    __slots__ = ("_known", "_replacement", "_value", "_value_json")

    def __init__(self, model: str) -> None:
        self._value = model
        self._value_json = orjson.dumps(model)
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
        out: list[bytes] = []
        done = 0  # bytes of `events` already in `out`
        for start, end in _data_lines(events):
            match = _MODEL_AT.match(events, start, end)
            if match is not None:
                if match.group(2) != self._value_json:
                    self._known = match.group(1) + match.group(2)
                    self._replacement = match.group(1) + self._value_json
                out += (events[done : match.start(2)], self._value_json)
                done = match.end(2)
            elif events.find(b'"model"', start, end) != -1:
                # A `model` the fast path cannot reach (after a nested value, or nested): decode this line.
                out += (events[done:start], self._rewrite_line(events[start:end]))
                done = end
        if not done:
            return events
        out.append(events[done:])
        return b"".join(out)

    def _rewrite_line(self, line: bytes) -> bytes:
        prefix = b"data: " if line.startswith(b"data: ") else b"data:"
        try:
            data = orjson.loads(line[len(prefix) :])
        except orjson.JSONDecodeError:
            return line
        if not isinstance(data, dict):
            return line
        # The top-level model, or the Responses API's `response.model` (response.created / .completed ...).
        holder = data if "model" in data else data.get("response")
        if not isinstance(holder, dict) or "model" not in holder or holder["model"] == self._value:
            return line
        holder["model"] = self._value
        return prefix + orjson.dumps(data)


def _data_lines(events: bytes) -> list[tuple[int, int]]:
    """(start, end) of each `data:` line in `events` that holds a `"model"`, its line ending excluded
    (LF, CRLF or CR, mixed as they come).

    Linear in `events` whatever its line endings: only lines holding a `"model"` are visited, and every
    search covers bytes no earlier search covered — backwards to the line's start no further than the
    last line visited, forwards to its end from where the next LF or CR was last found.
    """
    lines = []
    size = len(events)
    lf = cr = -1  # the next LF / CR at or after the line being read (-2: none left)
    done = 0  # bytes before this are behind us
    while (found := events.find(b'"model"', done)) != -1:
        start = max(events.rfind(b"\n", done, found), events.rfind(b"\r", done, found)) + 1
        if lf != -2 and lf < found:
            lf = events.find(b"\n", found)
            lf = -2 if lf == -1 else lf
        if cr != -2 and cr < found:
            cr = events.find(b"\r", found)
            cr = -2 if cr == -1 else cr
        stop = min(size if lf == -2 else lf, size if cr == -2 else cr)
        if events.startswith(b"data:", start):
            lines.append((start, stop))
        done = stop
    return lines


def data_json(event: bytes) -> Any:
    """Decode the JSON carried by an event's `data:` line(s); None when there is none."""
    parts = []
    for line in LINE_END.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    try:
        return orjson.loads(b"\n".join(parts))
    except orjson.JSONDecodeError:
        return None


def data_event(data: Any) -> bytes:
    """One `data: <json>` event of our own."""
    return b"data: " + orjson.dumps(data) + b"\n\n"
