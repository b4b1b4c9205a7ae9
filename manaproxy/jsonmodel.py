"""The top-level `model` member of a JSON object, read and replaced in the object's bytes.

Rule of this module: pure, and linear in the document — never a full decode on the common path. msgspec
validates the whole document while building nothing but the members asked for (about 1 GB/s, no
allocation for what it skips); `model_span` then finds that member's value in the bytes with
`bytes.find`, so `replace_model` changes those bytes and no other. Used both ways: on a client's request
body (`body.py`) and on an upstream's unstreamed answer (`providers/openai.py`).
"""

from __future__ import annotations

import re

import msgspec

Buffer = bytes | bytearray


class Head(msgspec.Struct):
    """Top-level members read without decoding the rest: each as its raw JSON bytes (b"" when absent)."""

    model: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    stream: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    usage: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    error: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    stream_options: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


HEAD = msgspec.json.Decoder(Head)
"""`HEAD.decode(raw)`: raises msgspec.DecodeError (not JSON), ValidationError (not an object) or
RecursionError (nested too deeply)."""

_SPACE = re.compile(rb"\s*")
_EMPTY_REST = re.compile(rb"\s*\}")
_KEY = b'"model"'
_COLON = re.compile(rb"\s*:\s*")
# A `\uXXXX` escape of a letter of "model": only then can a key spell "model" other than literally.
_ESCAPED_MODEL_LETTER = re.compile(rb"\\u006[4-5dDfFcC]")
_PROBE = b'"\\u0000probe"'


def _opens_string(raw: Buffer, start: int) -> bool:
    """Whether the `"` at `start` opens a JSON string (not an escaped quote inside one)."""
    backslashes = 0
    while start - backslashes > 0 and raw[start - backslashes - 1] == 0x5C:  # "\\"
        backslashes += 1
    return backslashes % 2 == 0


def model_span(raw: Buffer, model_raw: bytes) -> tuple[int, int] | None:
    """Where the top-level `model` value (`model_raw`, as `HEAD` read it) sits in `raw`: its span; or
    (p, p), the place to insert one, when there is none (`model_raw` empty); None when the bytes alone
    cannot tell (a nested `model` with the very same value, or a key spelled with escapes)."""
    if not model_raw:
        match = _SPACE.match(raw)
        start = (match.end() if match is not None else 0) + 1  # just inside the top-level `{`
        return (start, start)
    found = []
    position = raw.find(_KEY)
    while position != -1:
        colon = _COLON.match(raw, position + len(_KEY))
        value = colon.end() if colon is not None else -1
        if value != -1 and raw[value : value + len(model_raw)] == model_raw and _opens_string(raw, position):
            found.append(value)
        position = raw.find(_KEY, position + 1)
    if len(found) != 1:
        return None
    span = (found[0], found[0] + len(model_raw))
    if _ESCAPED_MODEL_LETTER.search(raw):
        # The top-level key may be spelled `"mod\u0065l"` and the match be a nested one: check.
        probe = b"".join((raw[: span[0]], _PROBE, raw[span[1] :]))
        if bytes(HEAD.decode(probe).model) != _PROBE:
            return None
    return span


def replace_model(raw: Buffer, span: tuple[int, int], encoded: bytes) -> tuple[memoryview, bytes, memoryview]:
    """The three pieces of `raw` with the value at `span` replaced by `encoded` (a JSON value); an empty
    span inserts a `"model"` member first. The pieces around it are views of `raw`, not copies."""
    start, end = span
    if start == end:
        separator = b"" if _EMPTY_REST.match(raw, start) else b","
        encoded = b'"model":' + encoded + separator
    view = memoryview(raw)
    return view[:start], encoded, view[end:]
