"""Gemini through the google-genai SDK: the one provider kind that translates instead of passing through.

`/chat/completions` (streamed or not) and `/embeddings` are translated (`request.py` out, `answer.py`
back, both pure); any other path is `unsupported` and the chain moves on. Every SDK exception is
translated once (`failures.py`) into the same `UpstreamFailure` taxonomy the openai kind uses, so
fallback rules are identical. Answers leave here client-ready: the translation writes the resolved
target as `model` and counts usage, so nothing downstream parses them again.

Timeouts: for streams `first_byte` bounds the wait for Gemini's first chunk and `idle` every later gap;
for unstreamed answers `total` bounds the exchange. `total` is also the SDK's own per-request timeout, so
it bounds a stream as a whole. The SDK's retries are off (one attempt): retrying is the chain's job.
Sizes: `server.max_response_bytes` bounds an unstreamed answer, `server.max_event_bytes` one event of a
stream, as for the openai kind (`bounds.py`: enforced under the SDK, as it reads).

One `genai.Client` per provider object, its requests pooled in the application's aiohttp session. The
SDK's abandoned streams are closed in tasks of the provider's own; `aclose()` (called by the runtime once
a reload's old providers are done with, and at shutdown) waits for those and closes what the client holds
besides the application's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import certifi
import orjson
from google import genai
from google.genai import errors, types
from google.genai.models import AsyncModels

from ...body import OFF_LOOP_BYTES
from ...config import ProviderConfig, ServerSettings
from ...redact import Redactor
from ..base import Call, ListedModel, MidStreamFailure, Reply, UpstreamFailure, Usage, within_idle
from . import answer, request
from .bounds import AnswerTooLarge, bounding_middleware
from .failures import bad_request, google_errors

_API_VERSIONS = ("v1", "v1beta", "v1alpha")
_SERVABLE_ACTIONS = frozenset({"generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents"})


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every google client, built as the SDK builds its own.

    Left to itself the SDK loads the CA bundle three times per client (~100 ms); a reload that rebuilds
    providers should not pay that each time.
    """
    return ssl.create_default_context(
        cafile=os.environ.get("SSL_CERT_FILE", certifi.where()), capath=os.environ.get("SSL_CERT_DIR")
    )


def _http_options(
    config: ProviderConfig, session: aiohttp.ClientSession | None, server: ServerSettings
) -> types.HttpOptions:
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
        async_client_args={
            "verify": _tls_context(),
            "ssl": _tls_context(),
            "middlewares": (bounding_middleware(server),),  # the answer's size bounds, as the SDK reads
        },
    )


T = TypeVar("T")

_MODEL_NAME_RE = re.compile(r"^(?:models/|tunedModels/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


async def _translated(call: Call, translate: Callable[[Mapping[str, Any]], T]) -> T:
    """`translate` applied to the whole request object: the decode and the walk in a worker thread when the
    body is large (`body.OFF_LOOP_BYTES`), so that no large body is decoded on the event loop."""
    if len(call.body.raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(lambda: translate(call.body.payload))
    return translate(call.body.payload)


async def _aclose(stream: Any) -> None:
    # Best effort: the stream may already have failed, and there is no one left to tell.
    with contextlib.suppress(Exception):
        await stream.aclose()


def _close_later(stream: Any, closing: set[asyncio.Task[None]]) -> None:
    """Close an SDK stream generator (releasing its connection) without awaiting it here; the task is held
    in `closing` (the provider's) so the loop does not drop it half-way and `aclose` can wait for it."""
    if not hasattr(stream, "aclose"):
        return
    task = asyncio.get_running_loop().create_task(_aclose(stream))
    closing.add(task)
    task.add_done_callback(closing.discard)


class GoogleStream:
    """A Gemini stream past its first chunk, relayed as OpenAI chunk events."""

    __slots__ = (
        "_closing",
        "_ended",
        "_idle",
        "_stream",
        "_translator",
        "complete",
        "first",
        "headers",
        "status",
        "usage",
    )

    def __init__(
        self,
        stream: AsyncIterator[types.GenerateContentResponse],
        translator: answer.ChunkTranslator,
        first: bytes,
        idle: float,
        closing: set[asyncio.Task[None]],
    ) -> None:
        self.status = 200
        self.headers: list[tuple[str, str]] = []  # the SDK's HTTP exchange is its own
        self.first = first
        self.complete = False  # `[DONE]` is written only once Gemini finished every candidate
        self.usage: Usage | None = None
        self._stream = stream
        self._translator = translator
        self._idle = idle
        self._ended = False
        self._closing = closing

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
            except AnswerTooLarge as exc:
                raise MidStreamFailure("upstream_error", str(exc)) from None
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
        # Counted when the client asked for the usage chunk, as for a passthrough stream.
        self.usage = translator.usage if translator.include_usage else None
        self.complete = True
        yield translator.finish()

    def close(self, *, reuse: bool) -> None:
        if not self._ended:
            self._ended = True
            _close_later(self._stream, self._closing)


class GoogleProvider:
    """Provider of kind `google`."""

    def __init__(
        self,
        config: ProviderConfig,
        session: aiohttp.ClientSession,
        redactor: Redactor | None = None,
        server: ServerSettings | None = None,
    ) -> None:
        self.config = config
        self._redactor = redactor if redactor is not None else Redactor([config])
        # The application's upstream session: the SDK pools its connections there (and, without one, would
        # open a session of its own that nothing closes). Never closed here.
        self.session = session
        self._client: genai.Client | None = None
        self._client_error = "provider is not configured (empty api_key)"
        self._closing: set[asyncio.Task[None]] = set()  # abandoned SDK streams being closed
        self._closed = False
        if config.configured:
            try:
                self._client = genai.Client(
                    vertexai=False,
                    api_key=config.api_key or None,
                    http_options=_http_options(config, session, server if server is not None else ServerSettings()),
                )
            except ValueError as exc:  # e.g. no API key anywhere
                self._client_error = f"cannot create the google-genai client: {exc}"

    def __repr__(self) -> str:
        return f"<GoogleProvider {self.config.name} {self.config.base_url or 'default endpoint'}>"

    async def aclose(self) -> None:
        """Wait for the abandoned streams being closed, then release what the SDK client holds besides the
        application's session (its own HTTP clients); once only."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            await self._client.aio.aclose()
            self._client.close()

    def _models(self) -> AsyncModels:
        if self._client is None:
            # Unconfigured is a deliberate state; a configured provider without a client is broken.
            raise UpstreamFailure.unconfigured(self._client_error, configured=self.config.configured)
        return self._client.aio.models

    async def send(self, call: Call) -> Reply | GoogleStream:
        path = call.path.partition("?")[0]  # a query string (e.g. api-version=) means nothing to Gemini
        if not _MODEL_NAME_RE.match(call.target.model):
            # The SDK refuses such names with a ValueError; it is the caller's request, not Google, at fault.
            error = request.TranslationError(
                f"invalid google model name {call.target.model[:100]!r}", param="model", code="invalid_model"
            )
            raise bad_request(error)
        if path == "/chat/completions":
            try:
                chat = await _translated(call, request.chat_request)
            except request.TranslationError as error:
                raise bad_request(error) from None
            config = chat.config.model_copy(
                update={"http_options": types.HttpOptions(headers={"X-Request-ID": call.request_id})}
            )
            if call.stream:
                return await self._open_stream(call, chat, config)
            return await self._complete(call, chat, config)
        if path == "/embeddings":
            return await self._embed(call)
        raise UpstreamFailure.unsupported(f"the google provider does not serve {call.path[:100]}")

    def _completion_id(self, call: Call) -> str:
        return f"chatcmpl-{call.request_id if len(call.request_id) <= 64 else uuid.uuid4().hex}"

    async def _complete(self, call: Call, chat: request.ChatRequest, config: types.GenerateContentConfig) -> Reply:
        models = self._models()
        with google_errors("waiting for the answer", self._redactor):
            async with asyncio.timeout(self.config.timeouts.total):
                response = await models.generate_content(model=call.target.model, contents=chat.contents, config=config)
            body = answer.chat_completion(
                response, completion_id=self._completion_id(call), model=str(call.target), created=int(time.time())
            )
        return Reply(200, orjson.dumps(body), "application/json", answer.usage_counts(body.get("usage")))

    async def _open_stream(
        self, call: Call, chat: request.ChatRequest, config: types.GenerateContentConfig
    ) -> GoogleStream:
        models = self._models()
        translator = answer.ChunkTranslator(
            completion_id=self._completion_id(call),
            model=str(call.target),
            created=int(time.time()),
            include_usage=chat.include_usage,
        )
        stream: AsyncIterator[types.GenerateContentResponse] | None = None
        try:
            with google_errors("before the first byte", self._redactor):
                async with asyncio.timeout(self.config.timeouts.first_byte):
                    # The SDK sends the request on the first `anext`, so the timeout covers connect to first chunk.
                    stream = await models.generate_content_stream(
                        model=call.target.model, contents=chat.contents, config=config
                    )
                    try:
                        response = await anext(stream)
                    except StopAsyncIteration:
                        raise UpstreamFailure.ended_early("google ended the stream before its first chunk") from None
                first = translator.translate(response)
        except BaseException:
            if stream is not None:
                _close_later(stream, self._closing)
            raise
        return GoogleStream(stream, translator, first, self.config.timeouts.idle, self._closing)

    async def _embed(self, call: Call) -> Reply:
        try:
            embed = await _translated(call, request.embeddings_request)
        except request.TranslationError as error:
            raise bad_request(error) from None
        models = self._models()
        config = embed.config.model_copy(
            update={"http_options": types.HttpOptions(headers={"X-Request-ID": call.request_id})}
        )
        with google_errors("waiting for the answer", self._redactor):
            async with asyncio.timeout(self.config.timeouts.total):
                response = await models.embed_content(model=call.target.model, contents=embed.texts, config=config)
            body = answer.embeddings(response, model=str(call.target), as_base64=embed.base64)
        return Reply(200, orjson.dumps(body), "application/json")

    async def list_models(self, timeout: float) -> list[ListedModel]:
        models = self._models()
        names: list[ListedModel] = []
        with google_errors("listing models", self._redactor):
            async with asyncio.timeout(timeout):
                pager = await models.list(config=types.ListModelsConfig(page_size=1000))
                async for model in pager:
                    actions = model.supported_actions
                    # Leave out what this proxy cannot serve (image/video `predict`, live-only models).
                    if model.name and (actions is None or _SERVABLE_ACTIONS.intersection(actions)):
                        names.append((model.name.removeprefix("models/"), None))  # Gemini gives no date
        return names

    async def probe(self, timeout: float) -> None:
        models = self._models()
        with google_errors("while probing", self._redactor):
            async with asyncio.timeout(timeout):
                await models.list(config=types.ListModelsConfig(page_size=1))
