"""The bare passthrough: the floor for `make bench`, not the product. Every manaproxy figure is read against it.

`python bench/bare.py --port P --route MODEL=URL [--route ...]` serves `POST /v1/...`: read the body, swap
`model` (MODEL → the upstream's `fake-model`), POST it to URL on one pooled `ClientSession`, relay the
answer's bytes. No routing beyond that lookup, no health, metrics, logs or error handling; uvloop.
"""

import argparse
import asyncio
import resource

import aiohttp
import orjson
import uvloop
from aiohttp import web


async def serve(port: int, routes: dict[str, str]) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        url = routes[body["model"]] + request.match_info["path"]
        body["model"] = "fake-model"
        async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as up:
            headers = {"Content-Type": up.headers.get("Content-Type", "application/json")}
            if not body.get("stream"):
                return web.Response(body=await up.read(), status=up.status, headers=headers)
            response = web.StreamResponse(status=up.status, headers=headers)
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def health(request: web.Request) -> web.Response:  # for the harness's readiness check
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/{path:.*}", relay)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()  # manaproxy's default backlog
    await asyncio.Event().wait()  # until SIGTERM from the harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", action="append", default=[], metavar="MODEL=URL", help="e.g. bare/x=http://h/v1/")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per client and one per upstream stream
    uvloop.run(serve(args.port, dict(route.split("=", 1) for route in args.route)))


if __name__ == "__main__":
    main()
