"""`kinds.request_kind`: the endpoint and the input's shape, as health scopes a model's failures."""

from __future__ import annotations

import orjson
import pytest

from manaproxy.kinds import request_kind

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


def chat(*parts: object, **extra: object) -> bytes:
    content = [{"type": "text", "text": "hi"}, *parts]
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **extra})


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        ("/chat/completions", chat(), "chat"),
        ("/chat/completions", chat(IMAGE), "chat+image"),
        ("/chat/completions", chat(AUDIO), "chat+audio"),
        ("/chat/completions", chat(tools=[TOOL]), "chat+tools"),
        ("/chat/completions", chat(IMAGE, tools=[TOOL]), "chat+image+tools"),
        # A text that mentions the words has its quotes escaped: still plain chat.
        ("/chat/completions", orjson.dumps({"messages": [{"content": 'say "image_url" and "tools"'}]}), "chat"),
        ("/completions", b'{"prompt": "hi"}', "completions"),
        ("/responses?x=1", orjson.dumps({"input": [{"type": "input_image", "image_url": "x"}]}), "responses+image"),
        ("/embeddings", b'{"input": "image_url"}', "embeddings"),
        ("/audio/transcriptions", b"--boundary\r\n...", "audio"),
        ("/images/generations", b"{}", "images"),
        ("/anything/else", b'{"tools": []}', "other"),
        ("/", b"", "other"),
    ],
)
def test_request_kind(path: str, body: bytes, kind: str) -> None:
    assert request_kind(path, body) == kind
