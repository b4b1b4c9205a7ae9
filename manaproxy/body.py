"""The client's request body: read within its limit, parsed once, sent on with another `model`.

Rule of this module: a request body is parsed here and nowhere else. `RequestBody` carries the client's
bytes and the parsed object; routing reads `model` and `stream` from it, the openai kind sends
`with_model(...)` upstream, the google kind translates `payload`.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .errors import ProxyError, bad_request

# Request Content-Encodings aiohttp decodes before the body reaches us (br/zstd only with their libraries;
# without them aiohttp refuses the request itself, see server.py). Any other it passes on raw.
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or 413 once it exceeds `limit` bytes (checked before reading when declared)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _DECODED_ENCODINGS:
        raise ProxyError(415, "request Content-Encoding is not supported", code="unsupported_content_encoding")
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ProxyError(
            413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
    except RequestPayloadError:  # e.g. `Content-Encoding: gzip` on a body that is not gzip
        raise bad_request("request body could not be decoded", code="invalid_body") from None
    return b"".join(chunks)


class RequestBody:
    """A client's JSON request object: its bytes as received and the object they hold."""

    __slots__ = ("_rest", "model", "payload", "raw", "stream")

    def __init__(self, raw: bytes, payload: dict[str, Any]) -> None:
        self.raw = raw
        self.payload = payload
        model = payload.get("model")
        self.model: str | None = model if isinstance(model, str) else None
        self.stream = payload.get("stream") is True
        self._rest: bytes | None = None  # the object without `model`, encoded on first use

    def __repr__(self) -> str:
        return f"<RequestBody {len(self.raw)} bytes model={self.model!r} stream={self.stream}>"

    def with_model(self, model: str) -> bytes:
        """The JSON body to send upstream: the client's, with `model` replaced."""
        rest = self._rest
        if rest is None:
            try:
                rest = orjson.dumps({key: value for key, value in self.payload.items() if key != "model"})
            except orjson.JSONEncodeError:  # orjson reads deeper nesting than it writes
                raise bad_request("request body is nested too deeply", code="invalid_json") from None
            self._rest = rest
        head = b'{"model":' + orjson.dumps(model)
        return head + b"}" if rest == b"{}" else head + b"," + rest[1:]


def parse_body(raw: bytes) -> RequestBody:
    """Decode the JSON request object and check the fields the proxy itself relies on (400 otherwise)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", code="invalid_model", param="model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", code="invalid_stream", param="stream")
    body = RequestBody(raw, payload)
    body.with_model("")  # a body orjson can read but not write is the caller's 400, before any upstream call
    return body
