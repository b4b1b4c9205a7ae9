"""The `manaproxy` command: `serve`, `check` and `status` (`statuscli.py`).

`serve` and `check` read an env file first (`--env-file PATH`, else `./.env` when present, as mana-llm did) into the process
environment, where variables already set win; what the file held is never logged or printed, only its names.

Signals only schedule work: SIGHUP sets off a reload task (`reload.Reloader.schedule`), SIGTERM/SIGINT set the stop event;
the reload and the drain run in the event loop and log there. systemd hears about each phase through
sd_notify (`READY=1` once listening, `RELOADING=1` … `READY=1` around a reload, `STOPPING=1`).

With `server.workers` > 1, `serve` runs the supervisor (supervisor.py) instead, which starts this same command
once per worker (`--worker INDEX:FD`, not for users): a worker reads no env file (it inherits the supervisor's
environment), listens with `SO_REUSEPORT`, tags its log lines with `pid=`, and tells its supervisor (not systemd)
when it listens and how each reload went.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import __version__, statuscli
from .app import create_app
from .clients import ENV_VAR, ClientTable, parse_env_clients
from .config import BUILTIN_PROVIDERS, Config, ConfigError, load_config
from .dotenv import DEFAULT_ENV_FILE, DotenvError, EnvFile, merge
from .gateway import GATEWAY, Gateway
from .logfmt import BatchedStreamHandler, OneLineFormatter
from .redact import too_short
from .reload import RELOADER
from .server import Runner
from .supervisor import LISTENING, WORKER_ARG, WorkerLink, supervise, worker_count
from .systemd import notify

logger = logging.getLogger("manaproxy")

DEFAULT_CONFIG = "./aliases.yaml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3025
# `serve` with an invalid config at start; the systemd unit does not restart on it (RestartPreventExitStatus).
EXIT_INVALID_CONFIG = 2
# How long requests cut at the end of the drain have to write their last bytes.
_CUT_GRACE_SECONDS = 2.0


class JournalFormatter(OneLineFormatter):
    """`<priority>message`: journald reads the prefix as the syslog level (`journalctl -p warning`)
    and stamps the time itself, so the line carries no timestamp of its own."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_syslog_priority(record.levelno)}>{super().format(record)}"


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def _stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal ($JOURNAL_STREAM names its device:inode)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return bool(inode) and (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def setup_logging(level_name: str | None, *, worker: bool = False) -> None:
    """Log to stderr: `time LEVEL logger: message`, or journald's `<priority>` form under systemd. A worker's
    messages start with `pid=N` (its lines share the supervisor's stderr) and are written whole (`shared`)."""
    name = (level_name or "info").upper()
    level = logging.getLevelNamesMapping().get(name)
    handler = BatchedStreamHandler(sys.stderr, shared=worker)
    message = f"pid={os.getpid()} %(message)s" if worker else "%(message)s"
    if _stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: " + message))
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: " + message))
    logging.basicConfig(level=level if level is not None else logging.INFO, handlers=[handler])
    if level is None:
        logger.warning("LOG_LEVEL=%r is not a level; using INFO", level_name)
    # aiohttp's access log would duplicate our one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # A log line per request is on the hot path: skip what our format never shows (the logging docs'
    # "Optimization" section: no caller frame walk, no thread/process/task names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one and return it.

    Every stream holds two sockets (the client's and the upstream's): the usual soft default of 1024
    would cap a process at ~500 streams. Under systemd the unit's `LimitNOFILE` sets both already.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft in (hard, resource.RLIM_INFINITY):
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # e.g. a seccomp filter that forbids setrlimit
        logger.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


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
    serve.add_argument(WORKER_ARG, default=None, help=argparse.SUPPRESS)  # INDEX:FD, from the supervisor
    check = commands.add_parser("check", help="validate a config file and exit (like nginx -t)")
    check.add_argument("--config", default=DEFAULT_CONFIG, help=f"aliases file (default {DEFAULT_CONFIG})")
    for command in (serve, check):
        command.add_argument(
            "--env-file",
            default=None,
            metavar="PATH",
            help=f"KEY=VALUE file read into the environment (default {DEFAULT_ENV_FILE} when present); "
            "variables already set win",
        )
    statuscli.add_parser(commands, f"http://{DEFAULT_HOST}:{os.environ.get('PORT') or DEFAULT_PORT}")
    return parser


def load_env_file(path: str | None) -> EnvFile | None:
    """Merge `path` (or `./.env` if there is one) into `os.environ`; None when there is no file to read."""
    if path is None:
        if not Path(DEFAULT_ENV_FILE).is_file():
            return None
        path = DEFAULT_ENV_FILE
    return merge(path, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check(args.config, args.env_file)
    if args.command == "status":
        return statuscli.main(args)
    link = WorkerLink(args.worker) if args.worker is not None else None
    try:
        # Before logging and the port: LOG_LEVEL and PORT may be in it. A worker has its supervisor's environment.
        env_file = load_env_file(args.env_file) if link is None else None
    except DotenvError as exc:
        setup_logging(os.environ.get("LOG_LEVEL"))
        logger.error("invalid env file, not starting: %s", exc)
        return EXIT_INVALID_CONFIG
    setup_logging(os.environ.get("LOG_LEVEL"), worker=link is not None)
    if env_file is not None:
        logger.info("%s", env_file.describe())
    port = args.port if args.port is not None else _default_port()
    try:
        config, _ = load_checked(args.config)  # fail fast, before the event loop starts
    except ConfigError as exc:
        logger.error("invalid config, not starting: %s", exc)
        return EXIT_INVALID_CONFIG
    workers = worker_count(config.server.workers)
    if link is None and workers > 1:
        return asyncio.run(supervise(config, args.config, args.host, port, workers))
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        return asyncio.run(serve(args.config, args.host, port, link))
    return uvloop.run(serve(args.config, args.host, port, link))


def _env_entries() -> list[str]:
    """The entries of `MANAPROXY_API_KEYS` (name:key pairs or bare keys), blanks left out."""
    return [entry.strip() for entry in os.environ.get(ENV_VAR, "").split(",") if entry.strip()]


def load_checked(path: str) -> tuple[Config, ClientTable]:
    """The config at `path` and its clients with those of `MANAPROXY_API_KEYS`; `ConfigError` when either is
    invalid or a client is declared in both places."""
    config = load_config(path)
    return config, ClientTable(parse_env_clients(_env_entries()), config.clients)


def check(path: str, env_file_path: str | None = None) -> int:
    try:
        env_file = load_env_file(env_file_path)
        config, clients = load_checked(path)
    except ConfigError as exc:
        print(f"manaproxy: config invalid: {exc}", file=sys.stderr)
        return 1
    unconfigured = [name for name, spec in config.providers.items() if not spec.configured]
    note = f"; unconfigured (no key in env): {', '.join(unconfigured)}" if unconfigured else ""
    who = f"clients {', '.join(clients.clients)}" if clients.enabled else "no clients (authentication off)"
    print(f"manaproxy: config ok: {config.summary()}{note}; {who}")
    if env_file is not None:
        print(f"  env file: {env_file.describe()}")
    for line in provider_lines(config):
        print(f"  {line}")
    for client in clients.clients.values():
        if not client.keys:
            print(
                f"manaproxy: warning: {client.where} has no key (empty after expansion): it cannot authenticate",
                file=sys.stderr,
            )
    for warning in too_short(config.providers.values()):
        print(f"manaproxy: warning: {warning}", file=sys.stderr)
    return 0


def provider_lines(config: Config) -> list[str]:
    """Per provider: built in or declared, configured or why not. Never a key or a URL (it may carry one)."""
    lines = []
    for name, spec in config.providers.items():
        origin = "built in" if spec.builtin else "declared"
        if spec.configured:
            state = "configured"
        elif spec.builtin:
            state = f"unconfigured ({BUILTIN_PROVIDERS[name][0]} is not set)"
        else:
            state = "unconfigured (its api_key is empty)"
        lines.append(f"provider {name}: {origin}, {state}")
    return lines


async def drain(runner: Runner, gateway: Gateway) -> None:
    """Stop listening, let the requests in flight finish within `server.shutdown_timeout_seconds` (read now,
    so a reload may change it), end what is left cleanly (drain.py), then close everything."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    timeout = gateway.config.server.shutdown_timeout_seconds
    logger.info("stopping: no new connections; draining in-flight requests (up to %gs)", timeout)
    for site in list(runner.sites):
        await site.stop()
    gateway.drain.stopping = True  # requests still arriving on open connections get a 503 and a close
    if not await gateway.drain.wait_idle(timeout):
        logger.warning("drain time is up: ending %d requests still in flight", gateway.drain.cut())
        await gateway.drain.wait_idle(_CUT_GRACE_SECONDS)
    # Closes idle connections, then the upstream session and the probes.
    await runner.cleanup()
    logger.info("stopped after draining for %.1fs", loop.time() - started)


async def serve(config_path: str, host: str, port: int, link: WorkerLink | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; SIGHUP reloads `config_path`. Returns the exit code.
    `link`: this is a worker of a supervisor, which it tells when it listens and how each reload went."""
    config = load_config(config_path)
    for line in provider_lines(config):
        logger.info("%s", line)
    for warning in too_short(config.providers.values()):
        logger.warning("%s", warning)
    open_files = raise_open_files_limit()
    api_keys = [entry.encode("utf-8", "surrogateescape") for entry in _env_entries()]
    cors = [origin.strip() for origin in os.environ.get("CORS_ORIGINS", "").split(",") if origin.strip()]
    app = create_app(config, api_keys=api_keys, cors_origins=cors)
    clients = app[GATEWAY].runtime.clients
    if not clients.enabled:
        logger.warning("no client keys (MANAPROXY_API_KEYS unset, no clients: in the config): authentication is OFF")
    else:
        logger.info("clients: %s", ", ".join(clients.clients))
        for client in clients.clients.values():
            if not client.keys:
                logger.warning("%s has no key (empty after expansion): it cannot authenticate", client.where)
    reloader = app[RELOADER]
    gateway = app[GATEWAY]
    runner = Runner(app)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_hup() -> None:
        if stop.is_set():
            logger.info("SIGHUP ignored: stopping")
            return
        reloader.schedule(config_path)

    # Before listening: from the first accepted connection on, a signal must never hit its default
    # action (SIGHUP's would kill the process).
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if link is not None:
        reloader.listeners.append(link.reloaded)
        link.watch(stop.set)
    try:
        await runner.setup()
        try:
            backlog = gateway.config.server.listen_backlog
            site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=link is not None, backlog=backlog)
            await site.start()
        except OSError as exc:
            logger.error("cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
            await runner.cleanup()
            return 1
        logger.info(
            "manaproxy %s listening on http://%s:%s (%s; up to %d open files, %d client connections)",
            __version__,
            host,
            port,
            config.summary(),
            open_files,
            runner.max_connections,
        )
        notify(f"READY=1\nSTATUS=serving {config.summary()}")  # a worker has no $NOTIFY_SOCKET: nothing is sent
        if link is not None:
            link.send(LISTENING)

        await stop.wait()
        notify("STOPPING=1")
        await drain(runner, gateway)
        return 0
    finally:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        # A late `systemctl reload` while the process exits must not turn a clean exit into a kill.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
