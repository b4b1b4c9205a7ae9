"""The client's request body: read within its limits, checked once, sent on with another `model`.

Rule of this module: a request body is decoded here and nowhere else. `parse_body` checks the whole
JSON document's structure but builds no objects for it (msgspec skips every member but `model` and
`stream`, at about 1 GB/s): a 32 MiB body costs its own bytes and ~30 ms, however many values it holds.
`RequestBody.with_model` splices the new `model` into the client's bytes, so everything else reaches the
upstream byte for byte (big integers, key order, spacing). The full object is decoded only for a provider
kind that translates the request (`payload`, used by google). Whether strings are valid UTF-8 is left
to whoever reads them: a passthrough upstream (which answers its own 400), or that full decode.

Bodies in flight are bounded twice: each by `server.max_body_bytes` (decoded size, checked while
reading), all together by `server.max_inflight_body_bytes` (`BodyBudget`): past it, a request is
refused with 503 and `Retry-After` rather than let memory grow with the number of uploads; and those of
one client by `server.max_inflight_body_bytes_per_client` (429 and `Retry-After`), so that a few clients
cannot fill the pool for everyone. A body's share is given back at the commit: from then on no chain
entry needs it again, and its bytes are freed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import orjson
from aiohttp import payload, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestPayloadError

from .errors import JSON_CONTENT_TYPE, ProxyError, bad_request
from .jsonmodel import HEAD, Buffer, model_span, replace_model

# Request Content-Encodings aiohttp decodes before the body reaches us (br/zstd only with their libraries;
# without them aiohttp refuses the request itself, see server.py). Any other it passes on raw.
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})
# Seconds a client refused for the body budget is told to wait.
BUDGET_RETRY_AFTER = 1


class BodyBudget:
    """Bytes of request bodies held in memory by all requests together, and by each client, against limits.

    A claim is given back when the request no longer needs its body: at the commit (no chain entry will
    be sent it again, see `proxy._Forwarder._commit`), or when the request ends.
    """

    __slots__ = ("_by_client", "held")

    def __init__(self) -> None:
        self.held = 0
        self._by_client: dict[str, int] = {}  # client -> bytes held; a client holding nothing is absent

    def __repr__(self) -> str:
        return f"<BodyBudget held={self.held} clients={len(self._by_client)}>"

    def held_by(self, client: str) -> int:
        return self._by_client.get(client, 0)

    @contextmanager
    def reserve(self, client: str = "", client_limit: int | None = None) -> Iterator[BodyBudget.Claim]:
        """A claim that grows as a body is read and is given back when the block exits (or before, by
        `Claim.release`). `client` names who asks (never a secret); it may hold at most `client_limit`."""
        claim = BodyBudget.Claim(self, client, client_limit)
        try:
            yield claim
        finally:
            claim.release()

    class Claim:
        __slots__ = ("_budget", "_client", "_client_limit", "size")

        def __init__(self, budget: BodyBudget, client: str, client_limit: int | None) -> None:
            self._budget = budget
            self._client = client
            self._client_limit = client_limit
            self.size = 0

        def grow(self, size: int, limit: int) -> None:
            """Hold `size` more bytes, or refuse: 503 when all bodies together would exceed `limit`, 429
            when this client's bodies would exceed its share."""
            budget = self._budget
            if budget.held + size > limit:
                raise ProxyError(
                    503,
                    "the proxy holds as many request bodies as it may; retry shortly",
                    code="body_budget_exhausted",
                    headers={"Retry-After": str(BUDGET_RETRY_AFTER)},
                )
            mine = budget._by_client.get(self._client, 0) + size
            if self._client_limit is not None and mine > self._client_limit:
                raise ProxyError(
                    429,
                    f"this client's request bodies in flight would exceed its share of {self._client_limit} bytes; "
                    "retry when one has been answered",
                    code="client_body_budget_exhausted",
                    headers={"Retry-After": str(BUDGET_RETRY_AFTER)},
                )
            budget.held += size
            budget._by_client[self._client] = mine
            self.size += size

        def release(self) -> None:
            """Give the claim back (once; later calls do nothing)."""
            if not self.size:
                return
            budget = self._budget
            budget.held -= self.size
            left = budget._by_client.get(self._client, 0) - self.size
            if left > 0:
                budget._by_client[self._client] = left
            else:
                budget._by_client.pop(self._client, None)
            self.size = 0


async def read_body(request: web.Request, limit: int, claim: BodyBudget.Claim, budget_limit: int) -> bytearray:
    """The request body: 415 for an encoding we cannot decode, 413 past `limit` bytes (checked before
    reading when declared), 503 when the bodies in flight would pass `budget_limit`."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in _DECODED_ENCODINGS:
        raise ProxyError(415, "request Content-Encoding is not supported", code="unsupported_content_encoding")
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ProxyError(
            413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large"
        )
    # One buffer that grows in place (glibc moves large blocks with mremap, not by copying): a body is
    # held once, never as a list of chunks plus their join.
    body = bytearray()
    try:
        async for chunk in request.content.iter_any():
            if len(body) + len(chunk) > limit:
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            claim.grow(len(chunk), budget_limit)
            body += chunk
    except RequestPayloadError:  # e.g. `Content-Encoding: gzip` on a body that is not gzip
        raise bad_request("request body could not be decoded", code="invalid_body") from None
    return body


class SplicedPayload(payload.Payload):
    """A large body sent as slices of the client's bytes around the new `model`: no copy of the body,
    and no single write bigger than a slice (the event loop gets its turns while it goes out)."""

    SLICE = 256 * 1024

    def __init__(self, pieces: tuple[Buffer | memoryview, ...], content_type: str = JSON_CONTENT_TYPE) -> None:
        super().__init__(pieces, content_type=content_type)
        self._length = sum(len(piece) for piece in pieces)
        self._size = self._length

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        left = self._length if content_length is None else content_length
        for piece in self._value:
            for offset in range(0, len(piece), self.SLICE):
                if left <= 0:
                    return
                part = piece[offset : offset + min(self.SLICE, left)]
                left -= len(part)
                await writer.write(part)


# What `with_model(..., include_usage=True)` puts first in the object: usage on a stream the client did not ask
# it for (`providers/streamusage.py` takes the extra chunk out again).
USAGE_MEMBER = b'"stream_options":{"include_usage":true}'


class RequestBody:
    """A client's JSON request object: its bytes as received and the members the proxy reads."""

    __slots__ = ("_model_span", "_payload", "model", "raw", "stream", "stream_options")
    content_type = JSON_CONTENT_TYPE

    def __init__(
        self, raw: Buffer, model: str | None, stream: bool, model_raw: bytes, stream_options: bytes = b""
    ) -> None:
        self.raw = raw
        self.model = model
        self.stream = stream
        self.stream_options = stream_options  # the member's raw JSON; b"" when absent
        self._payload: dict[str, Any] | None = None
        self._model_span = model_span(raw, model_raw)

    def __repr__(self) -> str:
        return f"<RequestBody {len(self.raw)} bytes model={self.model!r} stream={self.stream}>"

    @property
    def payload(self) -> dict[str, Any]:
        """The whole object, decoded on first use (for kinds that translate the request).

        Raises a 400 `ProxyError` for what only a full decode finds (text that is not UTF-8).
        """
        if self._payload is None:
            try:
                payload = orjson.loads(self.raw)
            except orjson.JSONDecodeError as exc:
                raise bad_request(f"request body is not valid JSON: {exc.msg}", code="invalid_json") from None
            assert isinstance(payload, dict)  # checked by parse_body
            self._payload = payload
        return self._payload

    def with_model(self, model: str, *, include_usage: bool = False) -> bytes | SplicedPayload:
        """The JSON body to send upstream: the client's bytes with `model` set to `model`; with `include_usage`
        (only for a body without `stream_options`), `USAGE_MEMBER` spliced in first."""
        span = self._model_span
        if span is None:  # bytes that do not tell which member is the top-level one: re-encode
            extra = {"stream_options": {"include_usage": True}} if include_usage else {}
            try:
                return orjson.dumps({**extra, **self.payload, "model": model})
            except orjson.JSONEncodeError:  # orjson reads deeper nesting than it writes
                raise bad_request("request body is nested too deeply", code="invalid_json") from None
        pieces = replace_model(self.raw, span, orjson.dumps(model))
        if include_usage:
            opening = _OPENING.match(self.raw)
            inside = opening.end() if opening is not None else 1  # just inside the top-level `{`
            head = pieces[0]
            # The object holds at least the `model` member (or gets it): a comma always follows ours.
            return _spliced((head[:inside], USAGE_MEMBER + b",", head[inside:], *pieces[1:]), self.content_type)
        return _spliced(pieces, self.content_type)


class MultipartBody:
    """A client's `multipart/form-data` request (audio transcriptions and translations, image edits): its
    bytes as received and the `model` and `stream` form fields. Only the `model` field's value changes on
    the way upstream; every other part, file bytes included, goes as it came."""

    __slots__ = ("_model_span", "content_type", "model", "raw", "stream")

    def __init__(self, raw: Buffer, content_type: str, fields: dict[str, tuple[int, int]]) -> None:
        self.raw = raw
        self.content_type = content_type  # the client's, with its boundary
        self._model_span = fields.get("model")
        self.model = _field_text(raw, self._model_span, "model") if self._model_span else None
        stream = fields.get("stream")
        self.stream = stream is not None and _field_text(raw, stream, "stream").strip().lower() == "true"

    def __repr__(self) -> str:
        return f"<MultipartBody {len(self.raw)} bytes model={self.model!r} stream={self.stream}>"

    @property
    def payload(self) -> dict[str, Any]:
        raise bad_request("a multipart form cannot be translated for this provider", code="unsupported_body")

    def with_model(self, model: str, *, include_usage: bool = False) -> bytes | SplicedPayload:
        """The form to send upstream: the client's bytes with the `model` field's value replaced."""
        if self._model_span is None:
            raise bad_request("the form has no 'model' field", code="model_required", param="model")
        start, end = self._model_span
        view = memoryview(self.raw)
        return _spliced((view[:start], model.encode(), view[end:]), self.content_type)


_OPENING = re.compile(rb"\s*\{")


def _spliced(pieces: tuple[memoryview | bytes, ...], content_type: str) -> bytes | SplicedPayload:
    """A body made of `pieces` (views of the client's bytes around a new value): joined when it is small,
    else sent slice by slice as they are (`SplicedPayload`), never copied whole."""
    if sum(len(piece) for piece in pieces) < SplicedPayload.SLICE:
        return b"".join(pieces)
    return SplicedPayload(pieces, content_type)


Body = RequestBody | MultipartBody

_BOUNDARY_PARAM = re.compile(r'(?i);\s*boundary=(?:"([^"]{1,70})"|([^;\s]{1,70}))')
_FIELD_NAME = re.compile(rb'(?i)^content-disposition:[^\r\n]*?;\s*name=(?:"((?:[^"\\\r\n]|\\.)*)"|([^;\s]+))', re.M)
_MAX_PART_HEADER = 16 * 1024


def _field_text(raw: Buffer, span: tuple[int, int], name: str) -> str:
    start, end = span
    if end - start > 1024:
        raise bad_request(f"the form field {name!r} is too long", code=f"invalid_{name}", param=name)
    try:
        return bytes(raw[start:end]).decode()
    except UnicodeDecodeError:
        raise bad_request(f"the form field {name!r} is not UTF-8 text", code=f"invalid_{name}", param=name) from None


def _form_fields(raw: Buffer, boundary: bytes) -> dict[str, tuple[int, int]]:
    """The value spans of the `model` and `stream` parts of a multipart/form-data body (RFC 7578).

    One pass with `bytes.find` for each delimiter: a 25 MB audio file costs a few milliseconds and no copy.
    """
    delimiter = b"--" + boundary
    closing = b"\r\n" + delimiter
    position = raw.find(delimiter)
    if position == -1:
        raise bad_request("the multipart body has no part", code="invalid_body")
    fields: dict[str, tuple[int, int]] = {}
    while True:
        position += len(delimiter)
        if raw[position : position + 2] == b"--":
            return fields  # the close delimiter
        head = raw.find(b"\r\n", position)
        head_end = raw.find(b"\r\n\r\n", head, head + _MAX_PART_HEADER) if head != -1 else -1
        if head_end == -1:
            raise bad_request("a multipart part has no complete header", code="invalid_body")
        value_end = raw.find(closing, head_end + 4)
        if value_end == -1:
            raise bad_request("a multipart part does not end with the boundary", code="invalid_body")
        named = _FIELD_NAME.search(raw, head + 2, head_end + 2)
        if named is not None:
            name = (named.group(1) or named.group(2) or b"").decode("latin-1")
            if name in ("model", "stream") and name not in fields:
                fields[name] = (head_end + 4, value_end)
        position = value_end + 2


def parse_body(raw: Buffer, content_type: str = JSON_CONTENT_TYPE) -> Body:
    """The request body as the proxy reads it: a JSON object, or a multipart form (by `content_type`)."""
    if content_type.lower().startswith("multipart/form-data"):
        boundary = _BOUNDARY_PARAM.search(content_type)
        if boundary is None:
            raise bad_request("multipart/form-data without a boundary", code="invalid_body")
        return MultipartBody(raw, content_type, _form_fields(raw, (boundary.group(1) or boundary.group(2)).encode()))
    return parse_json(raw)


def parse_json(raw: Buffer) -> RequestBody:
    """Check that `raw` is one JSON object whose `model` (if any) is a string and `stream` a boolean."""
    try:
        head = HEAD.decode(raw)
    except msgspec.ValidationError:  # valid JSON, but not an object
        raise bad_request("request body must be a JSON object", code="invalid_json") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    model_raw = bytes(head.model)
    model: Any = orjson.loads(model_raw) if model_raw else None
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", code="invalid_model", param="model")
    stream_raw = bytes(head.stream)
    if stream_raw not in (b"", b"true", b"false", b"null"):
        raise bad_request("'stream' must be a boolean", code="invalid_stream", param="stream")
    return RequestBody(raw, model, stream_raw == b"true", model_raw, bytes(head.stream_options))
