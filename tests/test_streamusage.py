"""providers/streamusage.py: what asking for usage adds to a stream, taken out again byte for byte."""

from __future__ import annotations

import pytest

from manaproxy.providers.streamusage import UsageStripper, may_inject

CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
WITH_NULL = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}],"usage":null}\n\n'
USAGE = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        (CHUNK, CHUNK),
        (WITH_NULL, CHUNK),
        (WITH_NULL + WITH_NULL, CHUNK + CHUNK),
        (WITH_NULL.replace(b',"usage":null', b', "usage": null'), CHUNK),
        (WITH_NULL.replace(b"null}", b'null,"obfuscation":"x"}'), CHUNK.replace(b"]}\n", b'],"obfuscation":"x"}\n')),
        (USAGE + DONE, DONE),
        (WITH_NULL + USAGE + DONE, CHUNK + DONE),
        (USAGE.replace(b"\n\n", b"\r\n\r\n") + DONE, DONE),
        # Not ours to take: usage inside a chunk that has choices (Groq's x_groq, a server's running count).
        (
            CHUNK.replace(b"]}\n", b'],"usage":{"prompt_tokens":1}}\n'),
            CHUNK.replace(b"]}\n", b'],"usage":{"prompt_tokens":1}}\n'),
        ),
        # Text that merely says "usage": null is text (its quotes are escaped).
        (CHUNK.replace(b"Hi", b'\\"usage\\":null'), CHUNK.replace(b"Hi", b'\\"usage\\":null')),
    ],
)
def test_strip(events, expected):
    assert UsageStripper().strip(events) == expected


@pytest.mark.parametrize(
    ("raw", "inject"),
    [
        (b"", True),
        (b'{"include_usage":true}', False),
        (b'{"include_usage": false}', False),
        (b"{}", False),
        (b"null", False),
    ],
)
def test_may_inject_only_when_the_client_named_no_stream_options(raw, inject):
    assert may_inject(raw) is inject
