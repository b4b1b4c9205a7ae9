"""`protocols.py`: what an OpenAI answer says (usage, errors, the end of a stream) and our own error events.

Tables of events as real servers send them; each `StreamProtocol` is checked through its data (end marker,
error framing), byte for byte where clients parse what we write.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from manaproxy.protocols import (
    CHAT,
    DONE_EVENT,
    OTHER,
    RESPONSES,
    StreamProtocol,
    error_event,
    error_of,
    for_path,
    has_done,
    usage_of,
)
from manaproxy.sse import data_json

from .fakes import chunk, data, typed_events

# -- an answer's errors and usage ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
            {
                "message": "overloaded",
                "type": "server_error",
            },
        ),
        (b'data: {"error": "boom"}\n\n', {"message": "boom"}),
        (b'data: {"error": 5}\r\n\r\n', {"message": "5"}),
        (b'event: error\ndata: {"error": {"message": "x"}}\n\n', {"message": "x"}),
        (b'data: {"choices": [], "error": null}\n\n', None),
        (b'data: {"meta": {"error": {"message": "x"}}}\n\n', None),
        (b': "error"\n\n', None),
        (b'data: "error" not json\n\n', None),
        (data(chunk(content="error")), None),
        (DONE_EVENT, None),
    ],
)
def test_error_of(event: bytes, expected: dict[str, Any] | None) -> None:
    assert error_of(event) == expected


GROQ_USAGE_CHUNK = {
    "id": "c1",
    "model": "llama",
    "choices": [{"delta": {}, "finish_reason": "stop"}],
    "x_groq": {"id": "req_1", "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}},
}


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (data(chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})), (3, 2)),
        (data(GROQ_USAGE_CHUNK), (10, 4)),
        (data({**GROQ_USAGE_CHUNK, "usage": None}), (10, 4)),
        (data(chunk(usage={"prompt_tokens": 7})), (7, 0)),
        (data(chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}), sep=b"\r\n\r\n"), (3, 2)),
        (
            data(chunk(usage={"prompt_tokens": 1, "completion_tokens": 1}))
            + data(chunk(usage={"prompt_tokens": 9, "completion_tokens": 8}))
            + DONE_EVENT,
            (9, 8),
        ),
        (data(chunk()) + DONE_EVENT, None),
        (data(chunk(content='"prompt_tokens": 3')), None),
        (data(chunk(usage={"prompt_tokens": True, "completion_tokens": 1})), None),
        (data(chunk(usage={"prompt_tokens": "3", "completion_tokens": 1})), None),
        (b': "prompt_tokens": 3\n\n', None),
        (b'data: {"usage": {"prompt_tokens": 3,\n\n', None),
    ],
)
def test_usage_of(events: bytes, expected: tuple[int, int] | None) -> None:
    assert usage_of(events) == expected


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (DONE_EVENT, True),
        (b"data:[DONE]\n\n", True),
        (b"data: [DONE]\r\n\r\n", True),
        (data(chunk()) + DONE_EVENT, True),
        (data(chunk()), False),
        (b": [DONE]\n\n", False),
        (b"data: [DON", False),
    ],
)
def test_has_done(events: bytes, expected: bool) -> None:
    assert has_done(events) is expected


def test_has_done_ignores_done_text_inside_content() -> None:
    # A model explaining OpenAI streaming writes exactly this text; a stream cut after it must not
    # count as complete (proxy.py would then end it without an error event).
    assert has_done(data(chunk(content="the stream ends with data: [DONE] and a blank line"))) is False


def test_error_event_shape() -> None:
    event = error_event("upstream x/y failed mid-stream: boom", code="upstream_error")
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    assert orjson.loads(event[6:]) == {
        "error": {
            "message": "upstream x/y failed mid-stream: boom",
            "type": "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }
    assert error_of(event) == orjson.loads(event[6:])["error"]
    assert not has_done(event)


def test_error_event_escapes_hostile_message() -> None:
    event = error_event('a\n\ndata: [DONE]\n\n"}', error_type="timeout_error")
    assert event.count(b"\n") == 2  # newlines in the message cannot end the event early
    assert orjson.loads(event[6:])["error"]["message"] == 'a\n\ndata: [DONE]\n\n"}'
    assert orjson.loads(event[6:])["error"]["type"] == "timeout_error"
    assert orjson.loads(event[6:])["error"]["code"] is None


# -- how each protocol ends a stream, and how ours ends in error ------------------------------------------------


@pytest.mark.parametrize(
    ("path", "protocol"),
    [
        ("/chat/completions", CHAT),
        ("/chat/completions?api-version=1", CHAT),
        ("/completions/", CHAT),
        ("/responses", RESPONSES),
        ("/embeddings", OTHER),
        ("/audio/speech", OTHER),
    ],
)
def test_for_path(path: str, protocol: StreamProtocol) -> None:
    assert for_path(path) is protocol


RESPONSES_EVENTS = b"".join(typed_events("m"))


@pytest.mark.parametrize(
    ("protocol", "events", "ended"),
    [
        (CHAT, data(chunk()) + DONE_EVENT, True),
        (CHAT, data(chunk()), False),
        (CHAT, data(chunk(content="data: [DONE]")), False),
        (CHAT, RESPONSES_EVENTS, False),
        (RESPONSES, RESPONSES_EVENTS, True),
        (RESPONSES, b"".join(typed_events("m", end="response.incomplete")), True),
        (RESPONSES, b"".join(typed_events("m", end="response.failed")), True),
        (RESPONSES, b"".join(typed_events("m", cut_after=-1)), False),
        (RESPONSES, data(chunk(content="response.completed")), False),
        (RESPONSES, DONE_EVENT, False),
        (OTHER, data(chunk()) + DONE_EVENT, False),  # only the end of the body ends it
        (OTHER, RESPONSES_EVENTS, False),
    ],
)
def test_ended_by(protocol: StreamProtocol, events: bytes, ended: bool) -> None:
    assert protocol.ended_by(events) is ended


def test_only_other_ends_with_the_body() -> None:
    assert [p.ends_with_body for p in (CHAT, RESPONSES, OTHER)] == [False, False, True]


@pytest.mark.parametrize("protocol", [CHAT, OTHER], ids=["chat", "other"])
def test_a_chat_error_event_is_a_bare_data_event(protocol: StreamProtocol) -> None:
    event = protocol.error_event("cut short", code="upstream_error")
    assert event == error_event("cut short", code="upstream_error")
    assert event == (
        b'data: {"error":{"message":"cut short","type":"server_error","param":null,"code":"upstream_error"}}\n\n'
    )
    assert not protocol.ended_by(event)


def test_a_responses_error_event_is_the_apis_typed_error_event() -> None:
    event = RESPONSES.error_event("cut short", code="idle_timeout")
    error = {"message": "cut short", "type": "server_error", "param": None, "code": "idle_timeout"}
    assert event.startswith(b"event: error\ndata: ")
    assert event.endswith(b"\n\n")
    assert event.count(b"\n") == 3
    assert data_json(event) == {
        "type": "error",
        "code": "idle_timeout",
        "message": "cut short",
        "param": None,
        "error": error,
    }
    assert error_of(event) == error
    assert not RESPONSES.ended_by(event)


def test_a_protocol_is_its_data() -> None:
    """Behaviour follows the fields, never the name: a protocol named like another behaves as its fields say."""
    renamed = StreamProtocol("chat", "response.completed", RESPONSES.end_words, RESPONSES.end_pattern, False, "error")
    assert renamed.ended_by(RESPONSES_EVENTS)
    assert not renamed.ended_by(DONE_EVENT)
    assert renamed.error_event("x") == RESPONSES.error_event("x")
