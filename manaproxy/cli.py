"""The `manaproxy` command: `serve` and `check`.

Signals only schedule work (STYLE 8): SIGHUP sets off a reload task, SIGTERM/SIGINT set the stop event;
the reload and the drain run in the event loop and log there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from . import __version__
from .app import create_app
from .auth import parse_keys
from .config import ConfigError, load_config
from .state import GATEWAY
from .systemd import notify

logger = logging.getLogger("manaproxy")

DEFAULT_CONFIG = "./aliases.yaml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3025


def setup_logging(level_name: str | None) -> None:
    name = (level_name or "info").upper()
    level = logging.getLevelNamesMapping().get(name)
    logging.basicConfig(
        level=level if level is not None else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level is None:
        logger.warning("LOG_LEVEL=%r is not a level; using INFO", level_name)
    # aiohttp's access log would duplicate our one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _default_port() -> int:
    value = os.environ.get("PORT", "")
    try:
        return int(value) if value else DEFAULT_PORT
    except ValueError:
        raise SystemExit(f"manaproxy: PORT={value!r} is not a port number") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manaproxy", description="OpenAI-compatible LLM gateway with alias chains and fallback."
    )
    parser.add_argument("--version", action="version", version=f"manaproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help=f"aliases file (default {DEFAULT_CONFIG})")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=None, help=f"port (default $PORT or {DEFAULT_PORT})")
    check = commands.add_parser("check", help="validate a config file and exit (like nginx -t)")
    check.add_argument("--config", default=DEFAULT_CONFIG, help=f"aliases file (default {DEFAULT_CONFIG})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check(args.config)
    setup_logging(os.environ.get("LOG_LEVEL"))
    port = args.port if args.port is not None else _default_port()
    try:
        load_config(args.config)  # fail fast, before the event loop starts
    except ConfigError as exc:
        logger.error("invalid config, not starting: %s", exc)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        return asyncio.run(serve(args.config, args.host, port))
    return uvloop.run(serve(args.config, args.host, port))


def check(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"manaproxy: config invalid: {exc}", file=sys.stderr)
        return 1
    unconfigured = [name for name, spec in config.providers.items() if not spec.configured]
    note = f"; unconfigured (no key in env): {', '.join(unconfigured)}" if unconfigured else ""
    print(f"manaproxy: config ok: {config.summary()}{note}")
    return 0


async def serve(config_path: str, host: str, port: int) -> int:
    config = load_config(config_path)
    api_keys = parse_keys(os.environ.get("MANAPROXY_API_KEYS"))
    if not api_keys:
        logger.warning("MANAPROXY_API_KEYS is not set: client authentication is OFF")
    cors = [origin.strip() for origin in os.environ.get("CORS_ORIGINS", "").split(",") if origin.strip()]
    app = create_app(config, api_keys=api_keys, cors_origins=cors)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that disconnects cancels its handler → upstream closed at once
        access_log=None,
        shutdown_timeout=config.server.shutdown_timeout_seconds,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
    except OSError as exc:
        logger.error("cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
        await runner.cleanup()
        return 1
    gateway = app[GATEWAY]
    logger.info("manaproxy %s listening on http://%s:%s (%s)", __version__, host, port, config.summary())
    notify("READY=1")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        notify("RELOADING=1")
        logger.info("SIGHUP: reloading %s", config_path)
        gateway.reload(config_path)
        notify("READY=1")

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    notify("STOPPING=1")
    logger.info("stopping: draining in-flight requests (up to %gs)", gateway.config.server.shutdown_timeout_seconds)
    await runner.cleanup()
    logger.info("stopped")
    return 0
