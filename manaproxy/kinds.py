"""What kind of request this is, for health: its endpoint and the shape of its input.

Rule of this module: pure, and bounded — a kind is made of a known endpoint word (anything else is `other`)
and at most the three shape words, so a client cannot make a model track more kinds than a few dozen.

A model's failures count per kind (`health/tracker.py`): a server without `--embeddings` that answers 501,
or a text-only model that answers 500 to every image, says nothing about plain chat with the same model. The
shape is read from the body's bytes without decoding it: `"image_url"` / `"input_image"` (an image part),
`"input_audio"` / `"audio"` (audio in or out), `"tools"` / `"functions"` (tool definitions). A JSON string
that merely mentions those words has its quotes escaped, so it does not match; the rare key of that name
elsewhere only moves the request to a neighbouring kind, which costs nothing but scoping.
"""

from __future__ import annotations

CHAT = "chat"  # a plain chat completion: text in, text out, no tools

# First path segment (after /v1) → endpoint word.
_ENDPOINTS = {
    "chat": CHAT,
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
    "audio": "audio",
    "images": "images",
    "moderations": "moderations",
    "rerank": "rerank",
}
# Endpoints whose JSON bodies mix content parts and tools: the ones whose shape is read.
_SHAPED = frozenset({CHAT, "responses", "completions"})
_SHAPES = (
    ("image", (b'"image_url"', b'"input_image"')),
    ("audio", (b'"input_audio"', b'"audio"')),
    ("tools", (b'"tools"', b'"functions"')),
)


def request_kind(path: str, body: bytes | bytearray) -> str:
    """`chat`, `chat+image`, `chat+tools`, `embeddings`, `audio`, `other` … for a request to `path` (after
    /v1, as `paths.upstream_path` returns it) with the raw `body`."""
    segment = path.partition("?")[0].lstrip("/").partition("/")[0]
    endpoint = _ENDPOINTS.get(segment, "other")
    if endpoint not in _SHAPED:
        return endpoint
    shapes = [name for name, needles in _SHAPES if any(needle in body for needle in needles)]
    return "+".join((endpoint, *shapes))
