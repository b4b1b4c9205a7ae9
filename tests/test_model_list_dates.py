"""`GET /v1/models`: each model's `created` is the upstream's when it gave one, else the time the config was
loaded — never 0, which the SDKs show as 1970."""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.test_utils import TestServer

from .helpers import build_config


async def test_models_carry_the_upstreams_created_or_the_config_load_time(make_proxy):
    async def models(request: web.Request) -> web.Response:
        data = [
            {"id": "dated", "object": "model", "created": 1712345678, "owned_by": "up"},
            {"id": "undated", "object": "model", "owned_by": "up"},
        ]
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    try:
        before = int(time.time())
        proxy = await make_proxy(build_config({"up": f"http://127.0.0.1:{upstream.port}/v1"}, {"mana/x": ["up/dated"]}))
        listed = {item["id"]: item["created"] for item in (await (await proxy.client.get("/v1/models")).json())["data"]}
        one = await (await proxy.client.get("/v1/models/mana/x")).json()
    finally:
        await upstream.close()

    assert listed["up/dated"] == 1712345678
    assert before <= listed["up/undated"] <= int(time.time())
    assert listed["mana/x"] == listed["up/undated"] == one["created"] == proxy.config.loaded_unix
