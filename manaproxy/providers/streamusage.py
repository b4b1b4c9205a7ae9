"""Usage on every stream: what manaproxy adds to a streamed chat request, and takes out of its answer again.

An OpenAI-compatible server reports a stream's tokens only when the request says `stream_options:
{"include_usage": true}`, and most clients do not. For a provider with `stream_usage: inject` (the default),
a streamed chat or completions request without `stream_options` goes upstream with it (`body.USAGE_MEMBER`,
spliced into the client's bytes), and the answer loses, before the client sees it, exactly what that adds:
the final chunk that carries only the usage (`"choices": []`) and the `"usage": null` member the server
then puts in every other chunk. The client gets the stream it asked for, byte for byte; manaproxy counts the
tokens. A request that names `stream_options` itself goes as it is (its usage chunk, if it asked for one, is
the client's).

Rule of this module: per chunk, one substring check when nothing is to be taken out; an event is parsed only
when it may be the usage chunk.
"""

from __future__ import annotations

import re

from ..sse import data_json

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The member a server that honours include_usage adds to every chunk but the last: `,"usage":null`. A JSON
# string cannot hold an unescaped quote, so `"usage"` preceded by a comma is a member, never text.
_NULL_USAGE = re.compile(rb',[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')


def may_inject(stream_options: bytes) -> bool:
    """Whether a request whose `stream_options` member is `stream_options` (raw JSON; b"" when absent) may be
    sent with `include_usage` added: only when it has none (one it has is the client's, as it is)."""
    return not stream_options


class UsageStripper:
    """Takes out of client-bound events what asking for usage added (see the module's docstring)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<UsageStripper>"

    def strip(self, events: bytes) -> bytes:
        """`events` (complete SSE events) without the usage-only chunk and the `"usage":null` members."""
        if b'"usage"' not in events:
            return events
        if b'_tokens"' in events:  # the usage chunk may be among them: drop that event whole
            events = b"".join(event for event in _events(events) if not _usage_only(event))
        return _NULL_USAGE.sub(b"", events)


def _events(events: bytes) -> list[bytes]:
    """`events` cut after each event boundary (a tail without one kept as the last piece)."""
    pieces = []
    start = 0
    for boundary in _BOUNDARY.finditer(events):
        pieces.append(events[start : boundary.end()])
        start = boundary.end()
    if start < len(events):
        pieces.append(events[start:])
    return pieces


def _usage_only(event: bytes) -> bool:
    """Whether `event` is the chunk `include_usage` adds: choices empty, usage an object."""
    if b'_tokens"' not in event:
        return False
    data = data_json(event)
    return isinstance(data, dict) and data.get("choices") == [] and isinstance(data.get("usage"), dict)
