"""The client's request body: read within its limits, checked once, sent on with another `model`.

Rule of this module: a request body is decoded here and nowhere else. `parse_body` checks the whole
JSON document's structure but builds no objects for it (msgspec skips every member but `model` and
`stream`, at about 1 GB/s): a 32 MiB body costs its own bytes and ~30 ms, however many values it holds.
`RequestBody.with_model` splices the new `model` into the client's bytes, so everything else reaches the
upstream byte for byte (big integers, key order, spacing). The full object is decoded only for a provider
kind that translates the request (`payload`, used by google). Whether strings are valid UTF-8 is left
to whoever reads them: a passthrough upstream (which answers its own 400), or that full decode.

What the proxy routes on is what the upstream runs: a body that could be read two ways is refused, not
guessed at — a JSON object with two top-level `model` (or `stream`) members in any spelling (first-wins
and last-wins parsers disagree), a form with two `model` (or `stream`) fields by `name` or `name*`
(RFC 7578 part headers, parsed as RFC 7578 and RFC 8187 say). The structure of a JSON body is bounded
before anything decodes it whole (`server.max_json_depth`, `server.max_json_items`, by a byte-level
count outside strings), a form's parts by `server.max_form_parts`; and a body larger than
`OFF_LOOP_BYTES` is parsed in a worker thread (`parse`), so no large body is walked on the event loop.

Bodies in flight are bounded twice: each by `server.max_body_bytes` (decoded size, checked while
reading), all together by `server.max_inflight_body_bytes` (`BodyBudget`): past it, a request is
refused with 503 and `Retry-After` rather than let memory grow with the number of uploads; and those of
one client by `server.max_inflight_body_bytes_per_client` (429 and `Retry-After`), so that a few clients
cannot fill the pool for everyone. A body's share is given back at the commit: from then on no chain
entry needs it again, and its bytes are freed.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import msgspec
import orjson
from aiohttp import HttpVersion11, payload, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestPayloadError

from .config import ServerSettings
from .errors import JSON_CONTENT_TYPE, ProxyError, bad_request
from .jsonmodel import HEAD, Buffer, model_span, replace_model

# Request Content-Encodings aiohttp decodes before the body reaches us (br/zstd only with their libraries;
# without them aiohttp refuses the request itself, see server.py). Any other it passes on raw.
_DECODED_ENCODINGS = frozenset({"", "identity", "gzip", "deflate", "br", "zstd"})
# Seconds a client refused for the body budget is told to wait.
BUDGET_RETRY_AFTER = 1
# Bodies larger than this are parsed (and, for the kinds that translate, decoded) in a worker thread: the
# loop keeps its turns between the bounded C calls that do it. Below it, the hop would cost more than the parse.
OFF_LOOP_BYTES = 256 * 1024
# Bytes of body read between two turns given to the loop (a few milliseconds of inflating).
_YIELD_EVERY = 1024 * 1024


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
    if (
        request.version == HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
        and not request.content.is_eof()
    ):
        # Sent here, past the key check and the declared size, not by aiohttp before any middleware ran
        # (app.py gives the routes an expect handler that sends nothing): a client refused never uploads.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    # One buffer that grows in place (glibc moves large blocks with mremap, not by copying): a body is
    # held once, never as a list of chunks plus their join.
    body = bytearray()
    unyielded = 0
    try:
        async for chunk in request.content.iter_any():
            if len(body) + len(chunk) > limit:
                raise ProxyError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            claim.grow(len(chunk), budget_limit)
            body += chunk
            unyielded += len(chunk)
            if unyielded > _YIELD_EVERY:
                # A compressed body is inflated as it is read, and a read of buffered bytes does not
                # yield: without this, 30 KiB of gzip would hold the loop for the whole 30 MB.
                unyielded = 0
                await asyncio.sleep(0)
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

    __slots__ = ("_model_span", "_payload", "_reencoded", "model", "raw", "stream", "stream_options")
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
        # Bytes that do not tell which `model` member is the top-level one: the object re-encoded once, here
        # (in the parse, off the loop for a large body), without `model`; `with_model` puts it first.
        self._reencoded = self._without_model() if self._model_span is None else b""

    def __repr__(self) -> str:
        return f"<RequestBody {len(self.raw)} bytes model={self.model!r} stream={self.stream}>"

    @property
    def payload(self) -> dict[str, Any]:
        """The whole object, decoded on first use (for kinds that translate the request; a large body in a
        worker thread, see `providers/google/provider._translated`).

        Raises a 400 `ProxyError` for what only a full decode finds (text that is not UTF-8).
        """
        if self._payload is None:
            self._payload = self._decode()
        return self._payload

    def _decode(self) -> dict[str, Any]:
        try:
            payload = orjson.loads(self.raw)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"request body is not valid JSON: {exc.msg}", code="invalid_json") from None
        assert isinstance(payload, dict)  # checked by parse_body
        return payload

    def _without_model(self) -> bytes:
        """The object's members but `model`, encoded, as `,"k":v...}` (or `}` when there is none)."""
        rest = {key: value for key, value in self._decode().items() if key != "model"}
        try:
            encoded = orjson.dumps(rest)
        except orjson.JSONEncodeError:  # orjson reads deeper nesting than it writes
            raise bad_request("request body is nested too deeply", code="json_too_deep") from None
        return b"}" if encoded == b"{}" else b"," + encoded[1:]

    def with_model(self, model: str, *, include_usage: bool = False) -> bytes | SplicedPayload:
        """The JSON body to send upstream: the client's bytes with `model` set to `model`; with `include_usage`
        (only for a body without `stream_options`), `USAGE_MEMBER` spliced in first."""
        span = self._model_span
        if span is None:  # bytes that do not tell which member is the top-level one: the re-encoded rest
            head = memoryview(b"{" + USAGE_MEMBER + b',"model":' if include_usage else b'{"model":')
            return _spliced((head, orjson.dumps(model), memoryview(self._reencoded)), self.content_type)
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
_MAX_PART_HEADER = 16 * 1024
# The fields the proxy reads: a form may hold each once.
_READ_FIELDS = ("model", "stream")
# A Content-Disposition parameter (RFC 6266 / RFC 7578): a token name, `=`, a quoted string (a `;` inside
# it is text, not a separator) or a token; the value is read as far as the next `;` only outside quotes.
_DISPOSITION_PARAM = re.compile(r'\s*;\s*([^\s;=]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]*))\s*')
_DISPOSITION_TYPE = re.compile(r"\s*[^\s;]*\s*")
_QUOTED_PAIR = re.compile(r"\\(.)")


def _field_text(raw: Buffer, span: tuple[int, int], name: str) -> str:
    start, end = span
    if end - start > 1024:
        raise bad_request(f"the form field {name!r} is too long", code=f"invalid_{name}", param=name)
    try:
        return bytes(raw[start:end]).decode()
    except UnicodeDecodeError:
        raise bad_request(f"the form field {name!r} is not UTF-8 text", code=f"invalid_{name}", param=name) from None


def _disposition_names(value: str) -> list[tuple[str, str]]:
    """The field names a Content-Disposition value gives its part, as `(parameter, name)` pairs: `name`,
    and `name*` decoded (RFC 8187, `utf-8''model`). 400 when the value cannot be parsed (a parser that
    guesses could read another name than ours)."""
    position = _DISPOSITION_TYPE.match(value).end()  # type: ignore[union-attr]  # matches the empty string
    names = []
    while position < len(value):
        param = _DISPOSITION_PARAM.match(value, position)
        if param is None or param.end() == position:
            if value[position:].strip(" \t;") == "":
                break  # a trailing `;`
            raise bad_request("a multipart part has a malformed Content-Disposition", code="invalid_body")
        position = param.end()
        key = param.group(1).lower()
        text = _QUOTED_PAIR.sub(r"\1", param.group(2)) if param.group(2) is not None else param.group(3)
        if key == "name*":
            charset, quote, rest = text.partition("'")
            _, quote2, encoded = rest.partition("'")
            if quote and quote2:
                try:
                    text = unquote(encoded, encoding=charset or "utf-8", errors="strict")
                except (LookupError, UnicodeDecodeError):
                    raise bad_request("a multipart part's name* cannot be decoded", code="invalid_body") from None
        if key in ("name", "name*"):
            names.append((key, text))
    return names


def _part_names(head: str) -> set[str]:
    """The field names of a part whose header block is `head` (lines without their CRLF, latin-1).

    Parsers differ on a part named twice (first or last `name`; `name` or `name*`) and on one named by
    `name*` alone (RFC 7578 forbids it; aiohttp reads it, Starlette does not): when one of the names is
    a field the proxy reads, the part is refused with 400 `ambiguous_model` (or `ambiguous_stream`).
    """
    names: list[tuple[str, str]] = []
    dispositions = 0
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t"):  # obsolete line folding: parsers join or drop it differently
            raise bad_request("a multipart part header is folded", code="invalid_body")
        header, colon, value = line.partition(":")
        if colon and header.strip().lower() == "content-disposition":
            dispositions += 1
            names += _disposition_names(value)
    if dispositions > 1:
        raise bad_request("a multipart part has two Content-Disposition headers", code="invalid_body")
    distinct = {name for _, name in names}
    read = sorted(distinct.intersection(_READ_FIELDS))
    if read and (len(distinct) > 1 or all(key == "name*" for key, _ in names)):
        raise bad_request(
            f"a form part is named {read[0]!r} ambiguously (two names, or name* alone): parsers disagree",
            code=f"ambiguous_{read[0]}",
            param=read[0],
        )
    return distinct


def _form_fields(raw: Buffer, boundary: bytes, max_parts: int) -> dict[str, tuple[int, int]]:
    """The value spans of the `model` and `stream` parts of a multipart/form-data body (RFC 7578).

    One pass with `bytes.find` for each delimiter: a 25 MB audio file costs a few milliseconds and no copy.
    A form with more than `max_parts` parts is refused (413) before any is walked; one with a second
    `model` or `stream` field with 400 `duplicate_model` (`duplicate_stream`), one with a part named so
    ambiguously with 400 `ambiguous_model` (see `_part_names`).
    """
    delimiter = b"--" + boundary
    closing = b"\r\n" + delimiter
    position = raw.find(delimiter)
    if position == -1:
        raise bad_request("the multipart body has no part", code="invalid_body")
    if raw.count(closing) > max_parts:  # at least the number of parts, whatever else the body holds
        raise ProxyError(
            413, f"the form has more than {max_parts} parts (server.max_form_parts)", code="too_many_form_parts"
        )
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
        for name in _part_names(bytes(raw[head + 2 : head_end]).decode("latin-1")).intersection(_READ_FIELDS):
            if name in fields:
                raise bad_request(
                    f"the form has more than one {name!r} field: upstreams disagree on which one counts",
                    code=f"duplicate_{name}",
                    param=name,
                )
            fields[name] = (head_end + 4, value_end)
        position = value_end + 2


def parse_body(
    raw: Buffer,
    content_type: str = JSON_CONTENT_TYPE,
    limits: ServerSettings = ServerSettings(),  # noqa: B008 - frozen
) -> Body:
    """The request body as the proxy reads it: a JSON object, or a multipart form (by `content_type`),
    within the structure bounds of `limits` (`max_json_depth`, `max_json_items`, `max_form_parts`)."""
    if content_type.lower().startswith("multipart/form-data"):
        boundary = _BOUNDARY_PARAM.search(content_type)
        if boundary is None:
            raise bad_request("multipart/form-data without a boundary", code="invalid_body")
        boundary_bytes = (boundary.group(1) or boundary.group(2)).encode()
        return MultipartBody(raw, content_type, _form_fields(raw, boundary_bytes, limits.max_form_parts))
    return parse_json(raw, limits.max_json_depth, limits.max_json_items)


async def parse(raw: Buffer, content_type: str, limits: ServerSettings) -> Body:
    """`parse_body`, in a worker thread when the body is larger than `OFF_LOOP_BYTES` (a small one is
    parsed at once: the hop would cost more than the parse)."""
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_body, raw, content_type, limits)
    return parse_body(raw, content_type, limits)


# The lowercase ASCII letters written as `\u00XX` escapes: only with one can a key spell `model` or
# `stream` other than literally (an `ensure_ascii` encoder escapes only what is not ASCII).
_ESCAPED_LETTER = re.compile(rb"\\u00(?:6[1-9a-fA-F]|7[0-9aA])")


class _ModelSeen:
    """A marker: one more occurrence of the member (see `_duplicate_member`)."""


class _StreamSeen:
    """A marker: one more occurrence of the member (see `_duplicate_member`)."""


class _Members(msgspec.Struct):
    model: _ModelSeen = msgspec.field(default_factory=_ModelSeen)
    stream: _StreamSeen = msgspec.field(default_factory=_StreamSeen)


_MARKERS: dict[type, str] = {_ModelSeen: "model", _StreamSeen: "stream"}


def _duplicate_member(raw: Buffer) -> str | None:
    """The name of a top-level member (`model` or `stream`) that `raw` holds twice, in any spelling."""
    escaped = b"\\u00" in raw and _ESCAPED_LETTER.search(raw) is not None
    names = [name for name in _READ_FIELDS if escaped or raw.count(b'"%s"' % name.encode()) > 1]
    if not names:  # each key appears at most once in the bytes, nested or not: no duplicate possible
        return None
    # msgspec decodes each key (escapes and all) and calls the hook once per occurrence of a member of a
    # custom type, where a dict would keep one: the tally counts occurrences. A decoder per call (rare:
    # only bytes that hold a key twice get here) keeps the tally this call's.
    tally = dict.fromkeys(_READ_FIELDS, 0)

    def hook(kind: type, value: Any) -> Any:
        tally[_MARKERS[kind]] += 1
        return kind()

    msgspec.json.Decoder(_Members, dec_hook=hook).decode(raw)
    return next((name for name in names if tally[name] > 1), None)


_BRACKETS_ONLY = bytes(range(256)).translate(None, b"[]{}")  # every byte but the four: deleted
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # opening +1, closing -1 (as signed bytes)
# Bytes looked at per step of the close look: each step is a few C calls on at most this much (and a list
# of at most this many pieces), so memory stays near the body and a worker thread lets the loop in between.
_STRUCTURE_SLICE = 256 * 1024


def _check_structure(raw: Buffer, max_depth: int, max_items: int, slice_size: int = _STRUCTURE_SLICE) -> None:
    """Refuse a JSON text nested deeper than `max_depth` (400 `json_too_deep`) or holding more than
    `max_items` values and members (413 `json_too_many_items`; counted as the `,`, `[` and `{` outside
    strings) before anything decodes it whole: 30 KiB of gzip can inflate to ten million empty arrays.

    A small body is counted on its bytes first: the brackets and commas of the raw text bound those
    outside strings from above, so the common body costs three `bytes.count`. A large one (parsed in a
    worker thread), or one past a limit that way, is read slice by slice, every step a short C call so
    that the loop gets the GIL in between: escapes dropped (`\\` pairs, then `\"`, as a JSON reader meets
    them left to right; a slice never ends inside a run of backslashes), the text between quotes dropped,
    and a running depth summed over the brackets left.
    """
    if len(raw) <= OFF_LOOP_BYTES and slice_size == _STRUCTURE_SLICE:
        opened = raw.count(b"[") + raw.count(b"{")
        if opened <= max_depth and opened + raw.count(b",") <= max_items:
            return
    items = depth = 0
    in_string = False
    start = 0
    while start < len(raw):
        end = start + slice_size
        while end < len(raw) and raw[end - 1] == 0x5C:  # "\\": keep an escape whole
            end += 1
        text = raw[start:end] if start or end < len(raw) else raw  # a small body: no copy
        start = end
        if b"\\" in text:
            text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
        pieces = text.split(b'"')
        outside = b"".join(pieces[1::2] if in_string else pieces[::2])
        in_string ^= len(pieces) % 2 == 0  # an odd number of quotes in the slice
        opened = outside.count(b"[") + outside.count(b"{")
        items += opened + outside.count(b",")
        if items > max_items:
            raise ProxyError(
                413,
                f"request body holds more than {max_items} JSON values (server.max_json_items)",
                code="json_too_many_items",
            )
        if depth + opened <= max_depth:
            depth += opened - outside.count(b"]") - outside.count(b"}")
            continue
        steps = array("b", outside.translate(_DEPTH_STEP, _BRACKETS_ONLY))
        if max(itertools.accumulate(steps, initial=depth)) > max_depth:
            raise bad_request(
                f"request body is nested more than {max_depth} levels deep (server.max_json_depth)",
                code="json_too_deep",
            )
        depth += sum(steps)


def parse_json(raw: Buffer, max_depth: int = 128, max_items: int = 1_000_000) -> RequestBody:
    """Check that `raw` is one JSON object whose `model` (if any) is a string and `stream` a boolean,
    each given once, within `max_depth` levels and `max_items` values (see `_check_structure`)."""
    # The structure first: it bounds what the decoders below recurse into and build, and it refuses a
    # pathological body in slices (a worker thread lets the loop in between) before one long decode. On
    # bytes that are not JSON at all its counts mean little: such a body is refused either way.
    _check_structure(raw, max_depth, max_items)
    try:
        head = HEAD.decode(raw)
    except msgspec.ValidationError:  # valid JSON, but not an object
        raise bad_request("request body must be a JSON object", code="invalid_json") from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="json_too_deep") from None
    duplicate = _duplicate_member(raw)
    if duplicate is not None:
        raise bad_request(
            f"request body has more than one top-level {duplicate!r} member: parsers disagree on which counts",
            code=f"duplicate_{duplicate}",
            param=duplicate,
        )
    model_raw = bytes(head.model)
    model: Any = orjson.loads(model_raw) if model_raw else None
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", code="invalid_model", param="model")
    stream_raw = bytes(head.stream)
    if stream_raw not in (b"", b"true", b"false", b"null"):
        raise bad_request("'stream' must be a boolean", code="invalid_stream", param="stream")
    return RequestBody(raw, model, stream_raw == b"true", model_raw, bytes(head.stream_options))
