"""Gemini through the google-genai SDK: the one provider kind that translates instead of passing through.

`/chat/completions` (streamed or not) and `/embeddings` are translated (google_translate.py holds the
mappings); any other path is `unsupported` and the chain moves on. Every SDK exception is translated
once, in `_google_errors`, into the same `UpstreamFailure` taxonomy the openai kind uses, so fallback
rules are identical: an HTTP error from Google goes through `UpstreamFailure.from_status` with an
OpenAI-shaped body.

Timeouts: for streams `first_byte` bounds the wait for Gemini's first chunk and `idle` every later gap;
for unstreamed answers `total` bounds the exchange. `total` is also the SDK's own per-request timeout, so
it bounds a stream as a whole. The SDK's retries are off (one attempt): retrying is the chain's job.

One `genai.Client` per provider object. Its aiohttp session is the SDK's own unless an application
session is passed in; `aclose()` releases it, and the SDK's own finalizer closes it when a reload drops
the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import certifi
import orjson
from google import genai
from google.genai import errors, types
from google.genai.models import AsyncModels

from ..config import ProviderConfig
from ..errors import error_body
from ..redact import Redactor
from ..upstream import Call, MidStreamFailure, Reply, UpstreamFailure, translate_errors, within_idle
from . import google_translate as translate

logger = logging.getLogger(__name__)

_API_VERSIONS = ("v1", "v1beta", "v1alpha")
_SERVABLE_ACTIONS = frozenset({"generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents"})
# Tasks closing abandoned SDK streams; held here so the loop does not drop them half-way.
_CLOSING: set[asyncio.Task[None]] = set()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every google client, built as the SDK builds its own.

    Left to itself the SDK loads the CA bundle three times per client (~100 ms); a reload that rebuilds
    providers should not pay that each time.
    """
    return ssl.create_default_context(
        cafile=os.environ.get("SSL_CERT_FILE", certifi.where()), capath=os.environ.get("SSL_CERT_DIR")
    )


def _http_options(config: ProviderConfig, session: aiohttp.ClientSession | None) -> types.HttpOptions:
    base_url = config.base_url or None
    api_version = "v1beta"
    if base_url is not None:
        # Accept a base_url that already names the API version (".../v1beta") as well as a bare host.
        head, _, last = base_url.rpartition("/")
        if last in _API_VERSIONS and urlsplit(head).hostname:
            base_url, api_version = head, last
    headers = dict(config.headers)
    if session is not None:
        # The application session relays bodies undecoded (auto_decompress=False); ask for none.
        headers["Accept-Encoding"] = "identity"
    return types.HttpOptions(
        base_url=base_url,
        api_version=api_version,
        headers=headers or None,
        timeout=max(1, round(config.timeouts.total * 1000)),
        retry_options=types.HttpRetryOptions(attempts=1),
        aiohttp_client=session,
        # `verify` reaches the SDK's httpx clients (unused for async calls), `ssl` its aiohttp requests.
        client_args={"verify": _tls_context()},
        async_client_args={"verify": _tls_context(), "ssl": _tls_context()},
    )


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


def _api_failure(exc: errors.APIError, redactor: Redactor) -> UpstreamFailure:
    """An HTTP error from Google, classified like any upstream status, with an OpenAI-shaped body."""
    code = exc.code if isinstance(exc.code, int) else 0
    if not 400 <= code <= 599:
        return UpstreamFailure("bad_response", f"unexpected HTTP {code} from google")
    message = redactor.line(str(exc.message or exc.status or f"HTTP {code}"), limit=1000)
    status_name = exc.status if isinstance(exc.status, str) else None
    body = error_body(message, status=code, code=status_name)
    if code == 400 and "API_KEY_INVALID" in _error_reasons(exc):
        # Google answers a wrong or expired key with 400, not 401: our credentials, not the caller's request.
        return UpstreamFailure("api_key_invalid", f"HTTP 400: {message[:120]}", status=400, body=body)
    if code == 400 and status_name == "FAILED_PRECONDITION":
        # e.g. "User location is not supported for the API use", free tier unavailable: the provider
        # cannot serve anyone from here, whatever the request; another chain entry may.
        return UpstreamFailure("failed_precondition", f"HTTP 400: {message[:120]}", status=400, body=body)
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


_MODEL_NAME_RE = re.compile(r"^(?:models/|tunedModels/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def _bad_request(error: translate.TranslationError) -> UpstreamFailure:
    body = error_body(error.message, status=400, code=error.code, param=error.param)
    return UpstreamFailure(
        "bad_request",
        error.message,
        fallback=False,
        provider_fault=False,
        status=400,
        body=body,
        content_type="application/json",
    )


async def _aclose(stream: Any) -> None:
    # Best effort: the stream may already have failed, and there is no one left to tell.
    with contextlib.suppress(Exception):
        await stream.aclose()


def _close_later(stream: Any) -> None:
    """Close an SDK stream generator (releasing its connection) without awaiting it here."""
    if not hasattr(stream, "aclose"):
        return
    task = asyncio.get_running_loop().create_task(_aclose(stream))
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


class GoogleStream:
    """A Gemini stream past its first chunk, relayed as OpenAI chunk events."""

    __slots__ = ("_ended", "_idle", "_stream", "_translator", "first", "status")

    def __init__(
        self,
        stream: AsyncIterator[types.GenerateContentResponse],
        translator: translate.ChunkTranslator,
        first: bytes,
        idle: float,
    ) -> None:
        self.status = 200
        self.first = first
        self._stream = stream
        self._translator = translator
        self._idle = idle
        self._ended = False

    async def events(self) -> AsyncGenerator[bytes, None]:
        stream = self._stream
        translator = self._translator
        idle = self._idle
        while True:
            try:
                response = await within_idle(anext(stream), idle, "google")
            except StopAsyncIteration:
                break
            except MidStreamFailure:
                raise
            except errors.APIError as exc:
                raise MidStreamFailure(
                    "upstream_error", f"google sent an error mid-stream: HTTP {exc.code} {exc.status or ''}".rstrip()
                ) from None
            except Exception as exc:  # whatever the SDK raises mid-answer ends the stream with an error event
                raise MidStreamFailure("upstream_error", f"google stream failed ({type(exc).__name__})") from None
            events = translator.translate(response)
            if events:
                yield events
        self._ended = True
        if not translator.complete:
            raise MidStreamFailure("upstream_error", "google ended the stream without a finish reason")
        yield translator.finish()

    def close(self, *, complete: bool) -> None:
        if not self._ended:
            self._ended = True
            _close_later(self._stream)


class GoogleProvider:
    """Provider of kind `google`."""

    def __init__(
        self, config: ProviderConfig, session: aiohttp.ClientSession, redactor: Redactor | None = None
    ) -> None:
        self.config = config
        self._redactor = redactor if redactor is not None else Redactor([config])
        # The application's upstream session: the SDK pools its connections there (and, without one, would
        # open a session of its own that nothing closes). Never closed here.
        self.session = session
        self._client: genai.Client | None = None
        self._client_error = "provider is not configured (empty api_key)"
        if config.configured:
            try:
                self._client = genai.Client(
                    vertexai=False, api_key=config.api_key or None, http_options=_http_options(config, session)
                )
            except ValueError as exc:  # e.g. no API key anywhere
                self._client_error = f"cannot create the google-genai client: {exc}"

    def __repr__(self) -> str:
        return f"<GoogleProvider {self.config.name} {self.config.base_url or 'default endpoint'}>"

    async def aclose(self) -> None:
        """Release what the SDK holds besides the application's session."""
        if self._client is not None:
            await self._client.aio.aclose()
            self._client.close()

    def _models(self) -> AsyncModels:
        if self._client is None:
            # Unconfigured is a deliberate state; a configured provider without a client is broken.
            raise UpstreamFailure("unconfigured", self._client_error, provider_fault=self.config.configured)
        return self._client.aio.models

    @contextmanager
    def _google_errors(self, phase: str) -> Iterator[None]:
        """Map every SDK exception to an `UpstreamFailure` (connection errors via `translate_errors`)."""
        try:
            with translate_errors(phase):
                yield
        except UpstreamFailure:
            raise
        except errors.APIError as exc:
            raise _api_failure(exc, self._redactor) from None
        except ValueError as exc:  # unparseable JSON, unexpected response shapes
            raise UpstreamFailure(
                "bad_response", f"unusable answer from google {phase} ({type(exc).__name__})"
            ) from None
        except Exception as exc:  # an SDK bug must read as this provider failing, not as a proxy crash
            logger.debug("google-genai raised %s %s", type(exc).__name__, phase, exc_info=True)
            raise UpstreamFailure("sdk_error", f"google-genai failed {phase} ({type(exc).__name__})") from None

    async def send(self, call: Call) -> Reply | GoogleStream:
        path = call.path.partition("?")[0]  # a query string (e.g. api-version=) means nothing to Gemini
        if not _MODEL_NAME_RE.match(call.model):
            # The SDK refuses such names with a ValueError; it is the caller's request, not Google, at fault.
            error = translate.TranslationError(
                f"invalid google model name {call.model[:100]!r}", param="model", code="invalid_model"
            )
            raise _bad_request(error)
        if path == "/chat/completions":
            try:
                request = translate.chat_request(call.payload)
            except translate.TranslationError as error:
                raise _bad_request(error) from None
            config = request.config.model_copy(
                update={"http_options": types.HttpOptions(headers={"X-Request-ID": call.request_id})}
            )
            if call.stream:
                return await self._open_stream(call, request, config)
            return await self._complete(call, request, config)
        if path == "/embeddings":
            return await self._embed(call)
        raise UpstreamFailure(
            "unsupported", f"the google provider does not serve {call.path[:100]}", fallback=True, provider_fault=False
        )

    def _completion_id(self, call: Call) -> str:
        return f"chatcmpl-{call.request_id if len(call.request_id) <= 64 else uuid.uuid4().hex}"

    async def _complete(self, call: Call, request: translate.ChatRequest, config: types.GenerateContentConfig) -> Reply:
        models = self._models()
        with self._google_errors("waiting for the answer"):
            async with asyncio.timeout(self.config.timeouts.total):
                response = await models.generate_content(model=call.model, contents=request.contents, config=config)
            body = translate.chat_completion(
                response, completion_id=self._completion_id(call), model=call.model, created=int(time.time())
            )
        return Reply(200, orjson.dumps(body), "application/json")

    async def _open_stream(
        self, call: Call, request: translate.ChatRequest, config: types.GenerateContentConfig
    ) -> GoogleStream:
        models = self._models()
        translator = translate.ChunkTranslator(
            completion_id=self._completion_id(call),
            model=call.model,
            created=int(time.time()),
            include_usage=request.include_usage,
        )
        stream: AsyncIterator[types.GenerateContentResponse] | None = None
        try:
            with self._google_errors("before the first byte"):
                async with asyncio.timeout(self.config.timeouts.first_byte):
                    # The SDK sends the request on the first `anext`, so the timeout covers connect to first chunk.
                    stream = await models.generate_content_stream(
                        model=call.model, contents=request.contents, config=config
                    )
                    try:
                        response = await anext(stream)
                    except StopAsyncIteration:
                        raise UpstreamFailure("closed", "google ended the stream before its first chunk") from None
                first = translator.translate(response)
        except BaseException:
            if stream is not None:
                _close_later(stream)
            raise
        return GoogleStream(stream, translator, first, self.config.timeouts.idle)

    async def _embed(self, call: Call) -> Reply:
        try:
            request = translate.embeddings_request(call.payload)
        except translate.TranslationError as error:
            raise _bad_request(error) from None
        models = self._models()
        config = request.config.model_copy(
            update={"http_options": types.HttpOptions(headers={"X-Request-ID": call.request_id})}
        )
        with self._google_errors("waiting for the answer"):
            async with asyncio.timeout(self.config.timeouts.total):
                response = await models.embed_content(model=call.model, contents=request.texts, config=config)
            body = translate.embeddings(response, model=call.model, as_base64=request.base64)
        return Reply(200, orjson.dumps(body), "application/json")

    async def list_models(self, timeout: float) -> list[str]:
        models = self._models()
        names = []
        with self._google_errors("listing models"):
            async with asyncio.timeout(timeout):
                pager = await models.list(config=types.ListModelsConfig(page_size=1000))
                async for model in pager:
                    actions = model.supported_actions
                    # Leave out what this proxy cannot serve (image/video `predict`, live-only models).
                    if model.name and (actions is None or _SERVABLE_ACTIONS.intersection(actions)):
                        names.append(model.name.removeprefix("models/"))
        return names

    async def probe(self, timeout: float) -> None:
        models = self._models()
        with self._google_errors("while probing"):
            async with asyncio.timeout(timeout):
                await models.list(config=types.ListModelsConfig(page_size=1))
