"""`sse.py`: event splitting across arbitrary chunk boundaries, the bytes-level `model` rewrite.

The rewrite is checked two ways: a table of hand-written events (key orders of real servers, escapes,
things that must stay byte-identical), and a seeded property test over random chunks built with orjson.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from manaproxy import sse
from manaproxy.protocols import DONE_EVENT
from manaproxy.sse import EventBuffer, ModelRewriter, data_json, is_data_event

from .fakes import chunk, data, stream_bytes
from .helpers import CHAT, chat

RESOLVED = "groq/llama-3.3-70b-versatile"


def events_of(line_end: bytes) -> list[bytes]:
    """A realistic stream as a list of complete events, every line ended with `line_end`."""
    blank = line_end
    raw = [
        [b": OPENROUTER PROCESSING"],
        [b"retry: 3000"],
        [b"data: " + orjson.dumps(chunk(content="Hel"))],
        [b"event: message", b"id: 7", b"data: " + orjson.dumps(chunk(content='lo "model" \\ \n'))],
        [b"data: " + orjson.dumps(chunk(content="", usage={"prompt_tokens": 3, "completion_tokens": 2}))],
        [b"data: [DONE]"],
    ]
    return [line_end.join(lines) + line_end + blank for lines in raw]


LINE_ENDS = [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf"), pytest.param(b"\r", id="cr")]


def feed_all(buffer: EventBuffer, pieces: Iterator[bytes], boundaries: set[int]) -> bytes:
    """Feed pieces; after every feed the released total must sit on an event boundary."""
    out = b""
    for piece in pieces:
        released = buffer.feed(piece)
        out += released
        assert len(out) in boundaries, f"released {len(out)} bytes: not an event boundary"
    return out


def boundaries_of(events: list[bytes]) -> set[int]:
    offsets, total = {0}, 0
    for event in events:
        total += len(event)
        offsets.add(total)
    return offsets


def random_splits(stream: bytes, rng: random.Random) -> Iterator[bytes]:
    pos = 0
    while pos < len(stream):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13, 64, 500])
        yield stream[pos : pos + size]
        pos += size


# -- EventBuffer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("line_end", LINE_ENDS)
def test_feed_byte_by_byte_releases_only_complete_events(line_end: bytes) -> None:
    events = events_of(line_end)
    stream = b"".join(events)
    buffer = EventBuffer()
    out = feed_all(buffer, (stream[i : i + 1] for i in range(len(stream))), boundaries_of(events))
    assert out == stream
    assert buffer.pending == b""


@pytest.mark.parametrize("line_end", LINE_ENDS)
def test_feed_random_splits(line_end: bytes) -> None:
    events = events_of(line_end) * 3
    stream = b"".join(events)
    boundaries = boundaries_of(events)
    rng = random.Random(1234)
    for _ in range(200):
        buffer = EventBuffer()
        out = feed_all(buffer, random_splits(stream, rng), boundaries)
        assert out == stream
        assert buffer.pending == b""


@pytest.mark.parametrize("line_end", LINE_ENDS)
def test_feed_keeps_incomplete_tail_pending(line_end: bytes) -> None:
    events = events_of(line_end)
    stream = b"".join(events)
    cut = len(events[0]) + len(events[1]) + 10  # ten bytes into the third event
    buffer = EventBuffer()
    assert buffer.feed(stream[:cut]) == events[0] + events[1]
    assert buffer.pending == stream[len(events[0]) + len(events[1]) : cut]
    assert buffer.feed(b"") == b""
    assert buffer.feed(stream[cut:]) == stream[len(events[0]) + len(events[1]) :]


@pytest.mark.parametrize(
    ("pieces", "released"),
    [
        ([b"data: a\n\n"], [b"data: a\n\n"]),
        ([b"data: a\n", b"\n"], [b"", b"data: a\n\n"]),
        ([b"data: a\r\n", b"\r\n"], [b"", b"data: a\r\n\r\n"]),
        ([b"data: a\r\n\r", b"\n"], [b"", b"data: a\r\n\r\n"]),
        ([b"data: a\r\n\r\nda", b"ta: b\r\n\r\n"], [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]),
        ([b"data: a\n\ndata: b\n\ndata: c"], [b"data: a\n\ndata: b\n\n"]),
        ([b"data: a"], [b""]),
        ([b""], [b""]),
    ],
)
def test_feed_table(pieces: list[bytes], released: list[bytes]) -> None:
    buffer = EventBuffer()
    assert [buffer.feed(piece) for piece in pieces] == released


@pytest.mark.parametrize("line_end", LINE_ENDS)
def test_first_event_skips_leading_comments(line_end: bytes) -> None:
    events = events_of(line_end)
    stream = b"".join(events)
    buffer = EventBuffer()
    released, rest = buffer.first_event(stream)
    # comment, retry, first data event; the complete events after it come back as `rest`
    assert released == b"".join(events[:3])
    assert rest == b"".join(events[3:])
    assert buffer.pending == b""
    assert data_json(released.split(line_end * 2)[-2]) == chunk(content="Hel")


@pytest.mark.parametrize("line_end", LINE_ENDS)
def test_first_event_byte_by_byte(line_end: bytes) -> None:
    events = events_of(line_end)
    stream = b"".join(events)
    head = b"".join(events[:3])
    buffer = EventBuffer()
    for i in range(len(head) - 1):
        assert buffer.first_event(stream[i : i + 1]) == (b"", b"")
    # The last byte of the first data event completes it; nothing after it has arrived yet.
    assert buffer.first_event(head[-1:]) == (head, b"")
    assert buffer.pending == b""
    assert buffer.feed(stream[len(head) :]) == stream[len(head) :]


def test_first_event_leaves_incomplete_tail_pending() -> None:
    buffer = EventBuffer()
    released, rest = buffer.first_event(b": ping\n\ndata: 1\n\ndata: 2\n\ndata: 3")
    assert (released, rest, buffer.pending) == (b": ping\n\ndata: 1\n\n", b"data: 2\n\n", b"data: 3")
    assert buffer.feed(b"\n\n") == b"data: 3\n\n"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b"data: x\n\n", True),
        (b"data:x\n\n", True),
        (b"event: message\ndata: x\n\n", True),
        (b"id: 1\r\ndata: x\r\n\r\n", True),
        (b"id: 1\rdata: x\r\r", True),
        (b": data: x\n\n", False),
        (b"event: ping\n\n", False),
        (b"retry: 10\n\n", False),
    ],
)
def test_is_data_event(event: bytes, expected: bool) -> None:
    assert is_data_event(event) is expected


# -- ModelRewriter: table -------------------------------------------------------------------------


def rewritten(events: bytes, model: str = RESOLVED) -> bytes:
    return ModelRewriter(model).rewrite(events)


def test_rewrites_top_level_model_in_place() -> None:
    before = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"llama","choices":[]}\n\n'
    after = before.replace(b'"llama"', b'"' + RESOLVED.encode() + b'"')
    assert rewritten(before) == after


def test_rewrite_keeps_spacing_and_line_endings() -> None:
    before = b'data:{ "id" : "c1" ,\t"model" :  "llama" , "choices": [] }\r\n\r\n'
    assert rewritten(before) == before.replace(b'"llama"', b'"' + RESOLVED.encode() + b'"')


def test_nested_model_keys_and_content_text_are_left_alone() -> None:
    obj = {
        "id": "c1",
        "model": "llama",
        "choices": [{"delta": {"content": 'the "model" field; "model": "x"', "model": "inner"}}],
        "meta": {"model": "nested"},
    }
    out = rewritten(data(obj))
    assert orjson.loads(out[6:]) == {**obj, "model": RESOLVED}


def test_content_that_is_just_the_word_model() -> None:
    obj = {"id": "c1", "object": "model", "model": "llama", "choices": [{"delta": {"content": "model"}}]}
    assert orjson.loads(rewritten(data(obj))[6:]) == {**obj, "model": RESOLVED}


def test_escaped_quotes_before_model() -> None:
    before = b'data: {"id":"a\\"b\\\\","note":"\\",\\"model\\":\\"fake","model":"llama"}\n\n'
    out = rewritten(before)
    assert orjson.loads(out[6:]) == {"id": 'a"b\\', "note": '","model":"fake', "model": RESOLVED}
    assert out == before.replace(b'"llama"', b'"' + RESOLVED.encode() + b'"')


def test_model_after_nested_objects_llama_cpp_order() -> None:
    # llama.cpp sorts keys: choices (nested) comes before model.
    obj = {
        "choices": [{"delta": {"content": "hi"}, "finish_reason": None, "index": 0}],
        "created": 1,
        "id": "c1",
        "model": "gemma",
        "object": "chat.completion.chunk",
    }
    out = rewritten(data(obj))
    assert orjson.loads(out[6:]) == {**obj, "model": RESOLVED}
    assert out.endswith(b"\n\n")


def test_mixed_fast_and_slow_lines_in_one_write() -> None:
    fast = chunk(model="a")
    slow = {"choices": [{"model": "x"}], "model": "b"}
    events = data(fast) + b": keepalive\n\n" + data(slow) + DONE_EVENT
    out = rewritten(events).split(b"\n\n")
    assert orjson.loads(out[0][6:]) == {**fast, "model": RESOLVED}
    assert out[1] == b": keepalive"
    assert orjson.loads(out[2][6:]) == {**slow, "model": RESOLVED}
    assert out[3] + b"\n\n" == DONE_EVENT


@pytest.mark.parametrize(
    "events",
    [
        pytest.param(DONE_EVENT, id="done"),
        pytest.param(b"data:[DONE]\r\n\r\n", id="done-crlf"),
        pytest.param(b': {"model": "x"}\n\n', id="comment-with-model"),
        pytest.param(b'event: model\ndata: "model" is not JSON\n\n', id="non-json-data"),
        pytest.param(b'data: {"choices": [}, "model": "x"\n\n', id="broken-json"),
        pytest.param(b'data: ["model", "x"]\n\n', id="json-array"),
        pytest.param(b'data: {"choices": [{"model": "x"}]}\n\n', id="only-nested-model"),
        pytest.param(b'data: {"id": "x", "choices": []}\n\n', id="no-model"),
        pytest.param(b'id: 1\r\nretry: 5\r\n: "model"\r\n\r\n', id="fields-crlf"),
        pytest.param(b'data: {"id":"1","model":"' + RESOLVED.encode() + b'"}\n\n', id="already-resolved"),
    ],
)
def test_leaves_other_events_byte_identical(events: bytes) -> None:
    assert rewritten(events) == events


@pytest.mark.parametrize(
    "model",
    [
        "openrouter/anthropic/claude-3-haiku",
        'p/quote"d',
        "p/back\\slash",
        'p/both\\"\\\\',
        "p/\\g<0>\\1",  # regex template syntax must come out literally
        "p/ünï\u2028cödé",
        "p/tab\tnl\n",
    ],
)
def test_model_names_with_special_characters(model: str) -> None:
    fast = chunk(model="m")
    slow = {"choices": [], "model": "m"}
    for obj in (fast, slow):
        out = rewritten(data(obj), model)
        assert orjson.loads(out[6:]) == {**obj, "model": model}
        assert out.endswith(b"\n\n")


def test_non_string_model_value_is_replaced() -> None:
    obj = {"id": "1", "model": None, "choices": []}
    assert orjson.loads(rewritten(data(obj))[6:]) == {**obj, "model": RESOLVED}


# -- ModelRewriter: property test ------------------------------------------------------------------

_TEXT_ATOMS = ["model", '"model"', '"model": "x"', "\\", '"', "/", "\n", "é", "😀", "{", "}", ",", ":", " ", "a"]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_TEXT_ATOMS) for _ in range(rng.randint(0, 6)))


def random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randint(0, 7 if depth < 3 else 4)
    if kind == 0:
        return random_text(rng)
    if kind == 1:
        return rng.randint(-(2**40), 2**40)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind == 3:
        return rng.uniform(-1e6, 1e6)
    if kind == 4:
        return random_text(rng)
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int) -> dict[str, Any]:
    keys = ["id", "object", "created", "choices", "usage", "x_groq", "model", random_text(rng)]
    return {key: random_value(rng, depth) for key in rng.sample(keys, rng.randint(0, len(keys)))}


def random_chunk(rng: random.Random) -> dict[str, Any]:
    obj = random_object(rng, 0)
    obj["model"] = rng.choice(["llama", random_text(rng), None, 7]) if rng.random() < 0.9 else random_text(rng)
    items = list(obj.items())
    rng.shuffle(items)  # top-level model before, between or after nested values
    return dict(items)


def test_property_rewrite_changes_only_top_level_model() -> None:
    rng = random.Random(20240607)
    for _ in range(400):
        model = rng.choice([RESOLVED, "openrouter/a/b", 'p/"q\\', "p/" + random_text(rng)])
        rewriter = ModelRewriter(model)
        objects = [random_chunk(rng) for _ in range(rng.randint(1, 4))]
        line_end = rng.choice([b"\n", b"\r\n"])
        events = b""
        for obj in objects:
            if rng.random() < 0.3:
                events += b": ping" + line_end * 2
            events += b"data: " + orjson.dumps(obj) + line_end * 2
        events += b"data: [DONE]" + line_end * 2

        out = rewriter.rewrite(events)

        lines = [line for line in out.split(line_end) if line]
        data_lines = [line for line in lines if line.startswith(b"data: {")]
        assert len(data_lines) == len(objects)
        for line, obj in zip(data_lines, objects, strict=True):
            expected = {**obj, "model": model}
            assert orjson.loads(line[6:]) == expected, (events, out)
            # Both paths keep key order and orjson's compact encoding: whole line is predictable.
            assert line == b"data: " + orjson.dumps(expected)
        assert [line for line in lines if not line.startswith(b"data: {")] == [
            line for line in events.split(line_end) if line and not line.startswith(b"data: {")
        ]


def test_property_rewrite_of_split_streams() -> None:
    """Released pieces of a random split, rewritten one by one, decode to the same objects."""
    rng = random.Random(77)
    for _ in range(50):
        objects = [random_chunk(rng) for _ in range(5)]
        stream = b"".join(data(obj) for obj in objects) + DONE_EVENT
        buffer = EventBuffer()
        rewriter = ModelRewriter(RESOLVED)
        out = b"".join(rewriter.rewrite(buffer.feed(piece)) for piece in random_splits(stream, rng))
        decoded = [orjson.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]
        assert decoded == [{**obj, "model": RESOLVED} for obj in objects]
        assert out.endswith(DONE_EVENT)


# -- the line scan behind the slow path: linear whatever the line endings ------------------------

# A `model` the fast path cannot reach (after a nested value), so the rewrite walks the event's lines.
SLOW = b'data: {"choices":[{"index":0}],"model":"llama"}'
SLOW_OUT = SLOW.replace(b'"llama"', b'"' + RESOLVED.encode() + b'"')


@pytest.mark.parametrize(
    ("events", "lines"),
    [
        (b"", []),
        (b"data: x\n\n", []),  # no `model`: no line is visited
        (SLOW + b"\n\n", [(0, len(SLOW))]),
        (SLOW + b"\r\n\r\n", [(0, len(SLOW))]),
        (SLOW + b"\r\r", [(0, len(SLOW))]),
        (SLOW, [(0, len(SLOW))]),  # no line end at all
        (b": c\n" + SLOW + b"\n\n", [(4, 4 + len(SLOW))]),
        (b": c\r\n" + SLOW + b"\r\n\r\n", [(5, 5 + len(SLOW))]),
        (b": c\r" + SLOW + b"\r\r", [(4, 4 + len(SLOW))]),
        # mixed: a bare CR far before, LF after; CRLF then CR; the same line twice
        (b"data: \r" + b"data: x\n" * 3 + SLOW + b"\n\n", [(31, 31 + len(SLOW))]),
        (SLOW + b"\r\n" + SLOW + b"\r\r", [(0, len(SLOW)), (len(SLOW) + 2, 2 * len(SLOW) + 2)]),
        (SLOW + b"\n" + SLOW + b"\r\n\r\n", [(0, len(SLOW)), (len(SLOW) + 1, 2 * len(SLOW) + 1)]),
        (b'event: "model"\r' + SLOW + b"\n\n", [(15, 15 + len(SLOW))]),  # not a data line: skipped
        (b'data: {"model":"a","x":"model"}\n', [(0, 31)]),  # two `"model"` in one line: one entry
    ],
)
def test_data_lines_for_every_line_ending(events: bytes, lines: list[tuple[int, int]]) -> None:
    assert sse._data_lines(events) == lines


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("stray", [b"", b"\n", b"\r\n", b"\r"])
def test_slow_path_rewrite_for_every_line_ending(line_end: bytes, stray: bytes) -> None:
    """Every line ending, and a stray other one earlier in the event: the model is rewritten, nothing else."""
    head = b"data: x" + stray + b"data: y" + line_end if stray else b""
    event = head + b"data: z" + line_end + SLOW + line_end + line_end
    assert rewritten(event) == event.replace(SLOW, SLOW_OUT)


class _CountingBytes(bytes):
    """bytes that count how many bytes their searches cover (what `_data_lines` spends)."""

    scanned = 0

    def find(self, sub, start=None, end=None):  # type: ignore[no-untyped-def,override]
        found = super().find(sub, start, end)
        stop = len(self) if end is None else end
        _CountingBytes.scanned += (stop if found == -1 else found + len(sub)) - (start or 0)
        return found

    def rfind(self, sub, start=None, end=None):  # type: ignore[no-untyped-def,override]
        found = super().rfind(sub, start, end)
        stop = len(self) if end is None else end
        _CountingBytes.scanned += stop - (start or 0 if found == -1 else found)
        return found


@pytest.mark.parametrize("stray", [b"\r", b"\n"])
@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_data_lines_searches_each_byte_a_bounded_number_of_times(line_end: bytes, stray: bytes) -> None:
    """Many lines, one stray line end of another kind (the hostile case: it once cost lines × bytes)."""
    for many in (b"data: x" + line_end, SLOW + line_end):
        events = _CountingBytes(b"data: " + stray + many * 20_000 + SLOW + line_end + line_end)
        _CountingBytes.scanned = 0
        sse._data_lines(events)
        assert _CountingBytes.scanned <= 4 * len(events)


async def test_event_of_a_million_lines_with_one_bare_cr_is_relayed_at_once(one):
    """A hostile upstream: one event of 1M short lines (7.6 MiB, under the 8 MiB event cap) with a bare
    CR at its start and a `model` only the slow path reaches. Scanning it from every line start froze
    the proxy for tens of seconds; now it is one pass."""
    a, proxy = one
    first = b'data: {"model":"m1","choices":[]}\n\n'
    hostile = b"data: \r" + b"data: x\n" * 1_000_000 + SLOW + b"\n\n"
    a.default = stream_bytes([first, hostile, b"data: [DONE]\n\n"], pause=0)
    started = time.perf_counter()
    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    body = await resp.read()
    elapsed = time.perf_counter() - started
    assert resp.status == 200
    assert body.endswith(b'"model":"a/m1"}\n\ndata: [DONE]\n\n')
    assert elapsed < 10, elapsed  # a few tenths of a second when idle; ~80 s before
