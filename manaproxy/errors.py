"""The errors manaproxy itself emits, all in the OpenAI shape with a truthful status.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` is what every OpenAI SDK parses
into `openai.APIStatusError` subclasses, so clients see our errors the way they see OpenAI's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from .requestid import REQUEST_ID

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type_for(status: int) -> str:
    """The OpenAI `type` for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, *, status: int, code: str | None = None, param: str | None = None) -> bytes:
    """Encode an OpenAI-shaped error object."""
    return orjson.dumps({"error": {"message": message, "type": error_type_for(status), "param": param, "code": code}})


class ProxyError(Exception):
    """An error answered to the client by manaproxy itself (not relayed from an upstream)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        relayed: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers  # e.g. Retry-After
        # A provider's own error object, answered as it is but for `message`: its `type`, `code` (null
        # included), `param` and any other member are what the client would have had from the provider.
        self.relayed = relayed

    def __repr__(self) -> str:
        return f"ProxyError({self.status}, {self.code!r}, {self.message!r})"

    @property
    def error_type(self) -> str:
        return error_type_for(self.status)

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        if self.relayed is not None:
            body = orjson.dumps({"error": {**self.relayed, "message": self.message}})
        else:
            body = error_body(self.message, status=self.status, code=self.code, param=self.param)
        return web.Response(
            status=self.status,
            body=body,
            content_type=JSON_CONTENT_TYPE,
            headers={**(self.headers or {}), **(headers or {})} if headers or self.headers else None,
        )


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> ProxyError:
    return ProxyError(400, message, code=code, param=param)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error we emit has the OpenAI shape: ours, aiohttp's (404/405/413 ...) and, last, bugs."""
    try:
        return await handler(request)
    except ProxyError as err:
        return err.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
        message = f"{request.method} {request.path[:200]}: {exc.reason}"
        return ProxyError(exc.status, message, code=code).response(
            headers={k: v for k, v in exc.headers.items() if k == "Allow"}
        )
    except Exception:
        logger.exception("request %s: unhandled error", request.get(REQUEST_ID, "-"))
        return ProxyError(500, "internal error in manaproxy", code="internal_error").response()
