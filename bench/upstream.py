"""The benchmark's upstream: manaproxy's own fake OpenAI server (`manaproxy.fake_upstream`), on uvloop.

Same app as `python -m manaproxy.fake_upstream`; only the event loop differs, so the upstream spends as
little CPU per request as it can and the numbers show the proxy's cost rather than the fake's.
Usage: `python bench/upstream.py --port P --tokens N [--delay-ms D]`. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web

from manaproxy.fake_upstream import create_fake_app


async def serve(port: int, tokens: int, delay_ms: float) -> None:
    runner = web.AppRunner(create_fake_app(tokens=tokens, delay_ms=delay_ms), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=50, help="words per answer (one SSE event each)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="pause before each streamed word")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.tokens, args.delay_ms))


if __name__ == "__main__":
    main()
