"""A provider that restarts for a second is used again within seconds, not after `backoff_seconds`; the
requests refused meanwhile are counted, not logged one WARNING each. Real process, real restart."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from .fakes import chat_completion
from .helpers import CHAT, build_config, chat
from .processes import free_port


async def start_provider(port: int) -> web.AppRunner:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m1", "object": "model"}]})

    async def complete(request: web.Request) -> web.Response:
        return web.json_response(chat_completion("m1"))

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", complete)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner


async def test_a_one_second_provider_restart_costs_seconds_not_the_backoff(serve):
    port = free_port()
    provider = await start_provider(port)
    health = {"failure_threshold": 2, "backoff_seconds": 60, "probe_interval_seconds": 30, "probe_timeout_seconds": 1}
    process = await serve(build_config({"p": f"http://127.0.0.1:{port}/v1"}, {"mana/x": ["p/m1"]}, health=health))
    statuses: list[tuple[float, int]] = []

    async with aiohttp.ClientSession() as session:

        async def ask() -> None:
            async with session.post(process.url + CHAT, json=chat()) as resp:
                await resp.read()
                statuses.append((time.monotonic(), resp.status))

        await ask()
        await provider.cleanup()  # the provider goes away ...
        for _ in range(3):  # ... requests fail and open the breaker, the next are refused
            await ask()
        await asyncio.sleep(1.0)
        provider = await start_provider(port)  # ... and is back one second later
        back = time.monotonic()
        try:
            while time.monotonic() - back < 10 and statuses[-1][1] != 200:
                await asyncio.sleep(0.1)
                await ask()
        finally:
            await provider.cleanup()

    assert [status for _, status in statuses[:4]] == [200, 503, 503, 503]
    answered_at, status = statuses[-1]
    assert status == 200
    assert answered_at - back < 4  # backoff_seconds is 60
    refused_by_breaker = [line for line in process.lines if "p/m1:unhealthy" in line]
    assert refused_by_breaker
    assert all(" INFO " in line for line in refused_by_breaker)
    assert len(process.lines_with("provider p unhealthy")) == 1
    assert process.lines_with("provider p recovered (a probe succeeded)")
