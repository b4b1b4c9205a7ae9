"""The one way the read-only views answer: a JSON document, encoded by orjson."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web


def json_response(data: Any, status: int = 200) -> web.Response:
    """`data` as an `application/json` answer."""
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
