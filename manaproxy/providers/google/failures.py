"""Everything google-genai raises, translated once into the providers' failure taxonomy.

An HTTP error from Google is classified like any upstream status (`UpstreamFailure.from_status`) with an
OpenAI-shaped body and its message redacted, with two Google-specific readings: a rejected key is a 400
`API_KEY_INVALID` (our credentials, not the caller's request), and a 400 `FAILED_PRECONDITION` (e.g. an
unsupported location) means no request can be served from here. Transport errors go through the shared
`translate_errors`; anything else the SDK raises reads as this provider failing, never as a proxy crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from google.genai import errors

from ...errors import error_body
from ...redact import Redactor
from ..base import UpstreamFailure, translate_errors
from .bounds import AnswerTooLarge
from .request import TranslationError

logger = logging.getLogger(__name__)


def _retry_after(exc: errors.APIError) -> str | None:
    """Retry-After from the response headers, else from Google's RetryInfo detail (`"retryDelay": "37s"`)."""
    headers = getattr(exc.response, "headers", None)
    if headers is not None and headers.get("Retry-After"):
        return str(headers["Retry-After"])
    details = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else None
    items = details.get("details") if isinstance(details, dict) else None
    for item in items if isinstance(items, list) else ():
        delay = item.get("retryDelay") if isinstance(item, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            return delay[:-1]
    return None


def api_failure(exc: errors.APIError, redactor: Redactor) -> UpstreamFailure:
    """An HTTP error from Google, classified like any upstream status, with an OpenAI-shaped body."""
    code = exc.code if isinstance(exc.code, int) else 0
    if not 400 <= code <= 599:
        return UpstreamFailure.bad_response(f"unexpected HTTP {code} from google")
    message = redactor.line(str(exc.message or exc.status or f"HTTP {code}"), limit=1000)
    status_name = exc.status if isinstance(exc.status, str) else None
    body = error_body(message, status=code, code=status_name)
    if code == 400 and "API_KEY_INVALID" in _error_reasons(exc):
        # Google answers a wrong or expired key with 400, not 401: our credentials, not the caller's request.
        return UpstreamFailure.credentials_refused(f"HTTP 400: {message[:120]}", body)
    if code == 400 and status_name == "FAILED_PRECONDITION":
        # e.g. "User location is not supported for the API use", free tier unavailable: the provider
        # cannot serve anyone from here, whatever the request; another chain entry may.
        return UpstreamFailure.failed_precondition(f"HTTP 400: {message[:120]}", body)
    retry_after = _retry_after(exc) if code == 429 else None
    headers = {"Retry-After": retry_after} if retry_after else {}
    return UpstreamFailure.from_status(code, headers, body, "application/json")


def _error_reasons(exc: errors.APIError) -> set[str]:
    """The `reason`s of a Google error's `details` (google.rpc.ErrorInfo), e.g. API_KEY_INVALID."""
    details = exc.details.get("error", exc.details) if isinstance(exc.details, dict) else None
    items = details.get("details") if isinstance(details, dict) else None
    if not isinstance(items, list):
        return set()
    return {item["reason"] for item in items if isinstance(item, dict) and isinstance(item.get("reason"), str)}


def bad_request(error: TranslationError) -> UpstreamFailure:
    body = error_body(error.message, status=400, code=error.code, param=error.param)
    return UpstreamFailure.caller_error(error.message, body)


@contextmanager
def google_errors(phase: str, redactor: Redactor) -> Iterator[None]:
    """Map every SDK exception to an `UpstreamFailure` (connection errors via `translate_errors`)."""
    try:
        with translate_errors(phase):
            yield
    except UpstreamFailure:
        raise
    except AnswerTooLarge as exc:  # past `max_response_bytes` or `max_event_bytes`, as the openai kind
        raise UpstreamFailure.too_large(str(exc)) from None
    except errors.APIError as exc:
        raise api_failure(exc, redactor) from None
    except ValueError as exc:  # unparseable JSON, unexpected response shapes
        raise UpstreamFailure.bad_response(f"unusable answer from google {phase} ({type(exc).__name__})") from None
    except Exception as exc:  # an SDK bug must read as this provider failing, not as a proxy crash
        logger.debug("google-genai raised %s %s", type(exc).__name__, phase, exc_info=True)
        raise UpstreamFailure.provider_failed(
            "sdk_error", f"google-genai failed {phase} ({type(exc).__name__})"
        ) from None
