"""Request ids: the client's `X-Request-ID` when it is sane, else a fresh one; echoed on every response.

The id names the request in the request log line, in upstream requests (`X-Request-ID`) and in the
client's answer, so one id follows a request end to end.
"""

from __future__ import annotations

import os
import re

from aiohttp import web
from aiohttp.typedefs import Handler

HEADER = "X-Request-ID"
REQUEST_ID = web.RequestKey("request_id", str)
# Anything else a client sends as its id (long, spaced, control characters) is replaced, not echoed.
_SANE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Take the client's id if it is sane, else make one; `echo_request_id` puts it on the response."""
    supplied = request.headers.get(HEADER, "")
    request[REQUEST_ID] = supplied if _SANE.match(supplied) else os.urandom(16).hex()
    return await handler(request)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every response carries the request's id, errors included."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[HEADER] = request_id
