"""The client's request target → the path that follows a provider's `base_url`.

Rule of this module: pure, and the only place a client-chosen path becomes part of an upstream URL.
Every forwarded request carries a provider key, so the path must stay under `base_url`: a dot segment
(`.` or `..`, raw or percent-encoded in any case), an encoded slash or backslash (`%2f`, `%5c`), a raw
backslash or an empty segment is refused before any upstream call, rather than "normalised" into a
different path. The result is already percent-encoded and is joined to `base_url` as an encoded URL,
so no client library resolves it a second time.
"""

from __future__ import annotations

import functools
import re

from .errors import ProxyError

PREFIX = "/v1"
# RFC 3986 pchar (unreserved, sub-delims, ':' and '@') plus '/' between segments, and valid %XX escapes.
_PATH_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*$")
# A query may also hold '?' and, as sent by real clients, '[' ']' '|' (aiohttp's parser lets them in).
_QUERY_RE = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?\[\]|]|%[0-9A-Fa-f]{2})*$")
# What a segment may not be once decoded: `.` or `..`; and what no segment may carry at all.
_DOT_SEGMENTS = frozenset({".", ".."})
_ENCODED_SEPARATOR_RE = re.compile(r"%(?:2[fF]|5[cC])")
_ENCODED_DOT_RE = re.compile(r"%2[eE]")


def _refuse(reason: str) -> ProxyError:
    return ProxyError(400, f"request path refused: {reason}", code="invalid_path")


@functools.lru_cache(maxsize=1024)  # pure, and the same few paths come again and again; refusals are not kept
def upstream_path(raw_path: str, raw_query: str = "") -> str:
    """`/chat/completions?x=1` for `/v1/chat/completions` and `x=1`, or a 400 `invalid_path`.

    `raw_path` is the path as the client sent it, percent-escapes intact and without the scheme and
    host of an absolute-form request target (aiohttp's `request.rel_url.raw_path`).
    """
    if not raw_path.startswith(PREFIX + "/"):
        raise _refuse("it must start with /v1/")
    path = raw_path[len(PREFIX) :]
    if not _PATH_RE.match(path):
        raise _refuse("it holds characters that are not allowed in a URL path")
    if _ENCODED_SEPARATOR_RE.search(path):
        raise _refuse("it holds an encoded '/' or '\\'")
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment == "" and index != len(segments) - 1:  # `//`; a trailing `/` is fine
            raise _refuse("it holds an empty segment ('//')")
        if _ENCODED_DOT_RE.sub(".", segment) in _DOT_SEGMENTS:
            raise _refuse("it holds a '.' or '..' segment")
    if not raw_query:
        return path
    if not _QUERY_RE.match(raw_query):
        raise _refuse("its query string holds characters that are not allowed in a URL")
    return f"{path}?{raw_query}"


# Endpoints whose objects live at one provider (uploaded files, batches, stored responses ...): a request to
# them without a `model` cannot be routed, and one provider of a chain could not find another's objects.
_STORED_OBJECTS = frozenset(
    {
        "files",
        "uploads",
        "batches",
        "vector_stores",
        "assistants",
        "threads",
        "fine_tuning",
        "fine-tunes",
        "containers",
        "conversations",
        "evals",
        "organization",
    }
)


def addresses_stored_object(path: str) -> bool:
    """Whether `path` (after /v1) names objects stored at one provider: `/files/...`, `/batches`,
    `/responses/{id}...`, `/chat/completions/{id}` ..."""
    segments = path.partition("?")[0].strip("/").split("/")
    if segments[0] in _STORED_OBJECTS:
        return True
    if segments[0] == "responses":
        return len(segments) > 1
    return segments[:2] == ["chat", "completions"] and len(segments) > 2
