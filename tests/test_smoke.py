"""The whole path once, end to end: alias → fallback → streamed answer through the openai SDK."""

from __future__ import annotations

import openai

from .fakes import chat_chunks, sse_reply, status_reply
from .helpers import build_config


async def test_alias_falls_back_and_streams_through_openai_sdk(make_upstream, make_proxy):
    down = await make_upstream("down")
    up = await make_upstream("up")
    down.default = status_reply(503)
    up.default = sse_reply(chat_chunks("m2", ["Hel", "lo"], usage=(3, 2)))
    proxy = await make_proxy(build_config({"down": down, "up": up}, {"mana/x": ["down/m1", "up/m2"]}))

    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="mana/x", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    await client.close()

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert {c.model for c in chunks} == {"up/m2"}
    assert down.requests[0].json["model"] == "m1"
    assert up.requests[0].json["model"] == "m2"
