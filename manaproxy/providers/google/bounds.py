"""The size bounds of a Gemini answer, enforced under the SDK, as it reads.

google-genai reads an unstreamed answer whole (`ClientResponse.text()`) and buffers a streamed one line
by line until a blank line, with no limit. So every request the SDK sends carries an aiohttp client
middleware that wraps the response's body stream: a body read whole stops at `server.max_response_bytes`,
and a body read as a stream stops once the bytes since its last blank line (the event being read) pass
`server.max_event_bytes` — the same two settings the openai kind obeys. Past either, `AnswerTooLarge`
is raised in the SDK's read and the provider turns it into the same failure the openai kind has:
`too_large` before the commit point (the chain moves on), an error event after it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ...config import ServerSettings

# What ends an event for the SDK: a blank line, the SDK splitting on LF and stripping a CR.
_EVENT_ENDS = (b"\n\n", b"\n\r\n")
_EVENT_END = re.compile(rb"\n\r?\n")  # the same, as one pattern


class AnswerTooLarge(Exception):
    """An answer (or one event of a stream) passed its bound; raised inside the SDK's read."""


class _BoundedContent:
    """A response's `StreamReader` as the SDK reads it: `read()` within `max_response`, `iter_any()` within
    `max_event` bytes per event. Anything else goes to the reader itself."""

    __slots__ = ("_content", "_max_event", "_max_response")

    def __init__(self, content: aiohttp.StreamReader, max_response: int, max_event: int) -> None:
        self._content = content
        self._max_response = max_response
        self._max_event = max_event

    def __getattr__(self, name: str) -> Any:
        return getattr(self._content, name)

    async def read(self, n: int = -1) -> bytes:
        """The whole body (what `ClientResponse.read`/`.text`/`.json` ask for), or `AnswerTooLarge`."""
        if n != -1:
            return await self._content.read(n)
        body = bytearray()
        async for chunk in self._content.iter_any():
            if len(body) + len(chunk) > self._max_response:
                raise AnswerTooLarge(f"google answer larger than {self._max_response} bytes")
            body += chunk
        return bytes(body)

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        """The body's chunks as they come, counting the bytes of each event (linear: each chunk is searched
        once, with the 2 bytes before it for a blank line split across chunks). A chunk that could hold an
        event past the bound has every event it ends measured: a whole event may come in one read."""
        limit = self._max_event
        pending = 0  # bytes of the event being read (since the last blank line)
        tail = b""
        async for chunk in self._content.iter_any():
            window = tail + chunk
            if pending + len(chunk) > limit:
                start = len(tail) - pending  # where the event being read began, in `window` (< 0: before it)
                for boundary in _EVENT_END.finditer(window):
                    if boundary.end() - start > limit:
                        raise AnswerTooLarge(f"google event larger than {limit} bytes")
                    start = boundary.end()
                pending = len(window) - start
            else:
                end = max((index + len(sep) if (index := window.rfind(sep)) != -1 else 0) for sep in _EVENT_ENDS)
                pending = len(window) - end if end else pending + len(chunk)
            if pending > limit:
                raise AnswerTooLarge(f"google event larger than {limit} bytes")
            tail = window[-2:]
            yield chunk


def bounding_middleware(server: ServerSettings) -> aiohttp.ClientMiddlewareType:
    """The client middleware that puts `server`'s answer bounds on every response the SDK reads."""
    max_response, max_event = server.max_response_bytes, server.max_event_bytes

    async def bound(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        response = await handler(request)
        response.content = _BoundedContent(response.content, max_response, max_event)  # type: ignore[assignment]
        return response

    return bound
