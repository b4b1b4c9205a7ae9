"""A small OpenAI-compatible server that answers without any LLM: for `make demo` and `make bench`.

`python bench/fake_upstream.py --port 3100 [--tokens 20] [--delay-ms 0]` serves
`POST /v1/chat/completions` (streamed or not), `POST /v1/embeddings` and `GET /v1/models` on uvloop, so
it spends as little CPU per request as it can and the benchmark's figures show the proxy's cost.
It echoes the requested `model`, so the proxy's rewrite is visible. Not part of manaproxy: a test tool.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import orjson
import uvloop
from aiohttp import web
from aiohttp_sse import sse_response
from procs import until_stopped

WORDS = [
    "manaproxy",
    "relays",
    "this",
    "answer",
    "from",
    "a",
    "fake",
    "upstream:",
    "each",
    "word",
    "arrives",
    "as",
    "one",
    "server-sent",
    "event,",
    "with",
    "only",
    "the",
    "model",
    "field",
    "rewritten",
    "on",
    "the",
    "way",
]

DELAY_MS = web.AppKey("delay_ms", float)
TOKENS = web.AppKey("tokens", int)


def _words(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(count)]


async def chat(request: web.Request) -> web.StreamResponse:
    payload: Any = orjson.loads(await request.read())
    model = payload.get("model", "fake")
    words = _words(request.app[TOKENS])
    delay = request.app[DELAY_MS] / 1000
    created = int(time.time())
    ident = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    usage = {"prompt_tokens": 9, "completion_tokens": len(words), "total_tokens": 9 + len(words)}
    if not payload.get("stream"):
        if delay:
            await asyncio.sleep(delay * len(words))
        message = {"role": "assistant", "content": " ".join(words)}
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }
        return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())
    include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    try:
        return await _stream(
            request,
            head={"id": ident, "object": "chat.completion.chunk", "created": created, "model": model},
            words=words,
            delay=delay,
            usage=usage if include_usage else None,
        )
    except ConnectionError:  # the client hung up: nothing to do
        raise web.HTTPException() from None


async def _stream(
    request: web.Request, *, head: dict[str, Any], words: list[str], delay: float, usage: dict[str, int] | None
) -> web.StreamResponse:
    async with sse_response(request, ping_interval=3600, allow_all_methods=True) as sse:
        first = {
            **head,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
        await sse.send(orjson.dumps(first).decode())
        for index, word in enumerate(words):
            if delay:
                await asyncio.sleep(delay)
            text = word if index == 0 else " " + word
            chunk = {**head, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            await sse.send(orjson.dumps(chunk).decode())
        last = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await sse.send(orjson.dumps(last).decode())
        if usage is not None:
            await sse.send(orjson.dumps({**head, "choices": [], "usage": usage}).decode())
        await sse.send("[DONE]")
    return sse


async def embeddings(request: web.Request) -> web.Response:
    payload: Any = orjson.loads(await request.read())
    inputs = payload.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(items))]
    body = {
        "object": "list",
        "data": data,
        "model": payload.get("model"),
        "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def models(request: web.Request) -> web.Response:
    body = {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def create_fake_app(*, tokens: int = 20, delay_ms: float = 0.0) -> web.Application:
    app = web.Application()
    app[TOKENS] = tokens
    app[DELAY_MS] = delay_ms
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app


async def serve(host: str, port: int, tokens: int, delay_ms: float) -> None:
    runner = web.AppRunner(create_fake_app(tokens=tokens, delay_ms=delay_ms), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    await until_stopped()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--tokens", type=int, default=20, help="words per answer (one SSE event each)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before each streamed word")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.tokens, args.delay_ms))


if __name__ == "__main__":
    main()
