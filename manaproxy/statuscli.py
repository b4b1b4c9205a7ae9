"""`manaproxy status`: the status page's picture in a terminal, for someone on SSH and for monitoring checks.

It reads `/v1/health`, `/v1/aliases` and `/v1/failures` of a running manaproxy (the client key from an
environment variable, sent as a Bearer header and nowhere else) and prints a line per alias, per provider and
per model that is not healthy, the last reload and the latest failures; coloured when stdout is a terminal
(unless `NO_COLOR` is set), one JSON document with `--json`, again every 2 s with `--watch`.

Rule of this module: the exit status is the verdict, so a monitoring check can run the command as it is —
0 healthy, 1 degraded, 2 unhealthy or unreachable (`assess` says which, and why, from the documents alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp

HEALTHY, DEGRADED, UNHEALTHY, UNREACHABLE = "healthy", "degraded", "unhealthy", "unreachable"
EXIT_CODES = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2, UNREACHABLE: 2}
DEFAULT_KEY_ENV = "MANAPROXY_API_KEYS"
WATCH_SECONDS = 2.0
TIMEOUT_SECONDS = 5.0
RECENT_SECONDS = 300.0  # failures this recent are counted in the summary line
SHOWN_FAILURES = 5

_COLOURS = {
    HEALTHY: "32",
    "applied": "32",
    DEGRADED: "33",
    "rate_limited": "33",
    "half_open": "33",
    "saturated": "35",
    UNHEALTHY: "31",
    UNREACHABLE: "31",
    "rejected": "31",
    "unconfigured": "2",
}


class Unreachable(Exception):
    """manaproxy could not be asked, or did not answer as it should (the message says which)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The three documents, as fetched at `time_unix`."""

    health: dict[str, Any]
    aliases: dict[str, Any]
    failures: dict[str, Any]
    time_unix: float


def add_parser(commands: Any, default_url: str) -> None:
    """The `status` subcommand, on the `manaproxy` command's subparsers."""
    status = commands.add_parser("status", help="show a running manaproxy's health (exit 0 healthy, 1 degraded, 2 not)")
    status.add_argument("--url", default=default_url, help=f"manaproxy's address (default {default_url})")
    status.add_argument(
        "--key-env",
        default=DEFAULT_KEY_ENV,
        metavar="VAR",
        help=f"environment variable holding the client key; its first comma-separated key is used "
        f"(default {DEFAULT_KEY_ENV}, as in manaproxy.env)",
    )
    status.add_argument("--watch", action="store_true", help=f"show it again every {WATCH_SECONDS:g}s until Ctrl-C")
    status.add_argument("--json", action="store_true", help="print JSON (one document per line with --watch)")


def client_key(variable: str, env: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The first key in `variable` (a `MANAPROXY_API_KEYS`-style comma-separated list), or None."""
    keys = [key.strip() for key in env.get(variable, "").split(",") if key.strip()]
    return keys[0] if keys else None


async def fetch(url: str, key: str | None, timeout: float = TIMEOUT_SECONDS) -> Snapshot:
    """The three documents, fetched at once; `Unreachable` when any cannot be had."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base = url.rstrip("/")

    async def get(session: aiohttp.ClientSession, path: str) -> dict[str, Any]:
        async with session.get(base + path, headers=headers, allow_redirects=False) as resp:
            if resp.status == 401:
                raise Unreachable(f"GET {path}: the client key was refused or is missing (see --key-env)")
            if resp.status != 200:
                raise Unreachable(f"GET {path}: HTTP {resp.status}")
            document = await resp.json(content_type=None)
            if not isinstance(document, dict):
                raise Unreachable(f"GET {path}: not a JSON object")
            return document

    try:
        async with aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            health, aliases, failures = await asyncio.gather(
                get(session, "/v1/health"), get(session, "/v1/aliases"), get(session, "/v1/failures")
            )
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:g}s") from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise Unreachable(str(exc) or type(exc).__name__) from None
    return Snapshot(health, aliases, failures, time.time())


# -- the verdict -------------------------------------------------------------------------------------------
def alias_status(alias: dict[str, Any]) -> str:
    """unhealthy: nothing can serve it; degraded: an entry with a key is kept out; healthy otherwise."""
    if not alias.get("serving"):
        return UNHEALTHY
    kept_out = any(not entry["available"] and entry["reason"] != "unconfigured" for entry in alias["entries"])
    return DEGRADED if kept_out else HEALTHY


def assess(snapshot: Snapshot) -> tuple[str, list[str]]:
    """(healthy / degraded / unhealthy, why not healthy).

    unhealthy: no configured provider is healthy, or an alias has nothing that can serve it. degraded: a
    provider or one of its models is not healthy, an alias has an entry kept out, or the last reload was
    rejected (the file on disk is not what serves).
    """
    unhealthy: list[str] = []
    degraded: list[str] = []
    health = snapshot.health
    if health.get("status") == UNHEALTHY:
        unhealthy.append("no configured provider is healthy")
    for name, provider in health.get("providers", {}).items():
        if provider["status"] not in (HEALTHY, "unconfigured"):
            degraded.append(f"provider {name} {provider['status']}")
        for model, detail in provider.get("models", {}).items():
            if detail["status"] != HEALTHY:
                degraded.append(f"model {name}/{model} {detail['status']}")
    for alias in snapshot.aliases.get("aliases", []):
        status = alias_status(alias)
        if status == UNHEALTHY:
            unhealthy.append(f"alias {alias['name']} has nothing to serve it")
        elif status == DEGRADED:
            degraded.append(f"alias {alias['name']} degraded")
    reloads = health.get("reloads") or []
    if reloads and reloads[0]["result"] != "success":
        degraded.append("the last reload was rejected")
    if unhealthy:
        return UNHEALTHY, unhealthy + degraded
    return (DEGRADED, degraded) if degraded else (HEALTHY, [])


# -- the lines ---------------------------------------------------------------------------------------------
def _clock(unix: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix)) if unix else "-"


def _span(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _paint(word: str, colour: bool) -> str:
    code = _COLOURS.get(word)
    return f"\x1b[{code}m{word}\x1b[0m" if colour and code else word


def _columns(rows: Iterable[tuple[str, str, str, str]], colour: bool) -> list[str]:
    """`kind name status detail` rows, the name and status columns padded to line up."""
    rows = list(rows)
    name_width = max((len(row[1]) for row in rows), default=0)
    status_width = max((len(row[2]) for row in rows), default=0)
    return [
        f"{kind:<8}  {name:<{name_width}}  {_paint(status, colour)}{' ' * (status_width - len(status))}  {detail}".rstrip()
        for kind, name, status, detail in rows
    ]


def _breaker(item: dict[str, Any]) -> str:
    since = f"since {_clock(item['since_unix'])}" if item.get("since_unix") else "since start"
    parts = [f"breaker {item['breaker']} {since}"]
    if item["consecutive_failures"]:
        parts.append(f"{item['consecutive_failures']} failures")
    if item.get("unhealthy_until_unix"):
        parts.append(f"out until {_clock(item['unhealthy_until_unix'])}")
    return ", ".join(parts)


def render(snapshot: Snapshot, url: str, *, colour: bool) -> list[str]:
    """The picture, line by line."""
    health = snapshot.health
    status, _ = assess(snapshot)
    process = health.get("process", {})
    head = f"manaproxy {url}  {_paint(status, colour)}"
    if process:
        head += f"  version {process['version']}, up {_span(process['uptime_seconds'])}, config {process['config']}"
    rows: list[tuple[str, str, str, str]] = []
    for alias in snapshot.aliases.get("aliases", []):
        skipped = [
            f"{entry['target']} {entry['reason']}"
            + (f" until {_clock(entry['until_unix'])}" if entry.get("until_unix") else "")
            + (f", next try {_clock(entry['retry_unix'])}" if entry.get("retry_unix") else "")
            for entry in alias["entries"]
            if not entry["available"]
        ]
        detail = f"serving {alias['serving'] or 'nothing (requests get 503)'}"
        if skipped:
            detail += "; skipped: " + ", ".join(skipped)
        rows.append(("alias", alias["name"], alias_status(alias), detail))
    for name, provider in health.get("providers", {}).items():
        limit = f"/{provider['max_concurrent']}" if provider.get("max_concurrent") else ""
        detail = f"{_breaker(provider)}, in flight {provider['in_flight']}{limit}"
        if provider.get("last_error") and provider["status"] != HEALTHY:
            detail += f": {provider['last_error']}"
        rows.append(("provider", name, provider["status"], detail))
        for model, item in provider.get("models", {}).items():
            if item["status"] != HEALTHY:
                detail = f"{_breaker(item)}, in flight {item['in_flight']}"
                if item.get("last_error"):
                    detail += f": {item['last_error']}"
                rows.append(("  model", f"{name}/{model}", item["status"], detail))
    for reload in (health.get("reloads") or [])[:1]:
        word = "applied" if reload["result"] == "success" else "rejected"
        rows.append(("reload", _clock(reload["time_unix"]), word, reload.get("error") or ""))
    failures = snapshot.failures.get("failures", [])
    recent = [item for item in failures if snapshot.time_unix - item["time_unix"] < RECENT_SECONDS]
    for item in failures[:SHOWN_FAILURES]:
        attempts = ", ".join(f"{attempt['target']}:{attempt['reason']}" for attempt in item["attempts"])
        where = item.get("alias") or item.get("model") or "(default)"
        detail = f"{where} -> {item.get('resolved') or '-'}" + (f" after {attempts}" if attempts else "")
        extra = [item.get("error"), f"{item['duration_seconds'] * 1000:.0f} ms", item.get("client"), item["request_id"]]
        detail += "  (" + ", ".join(str(part) for part in extra if part) + ")"
        rows.append(("failure", _clock(item["time_unix"]), str(item["status"]), detail))
    lines = [head, *_columns(rows, colour)]
    lines.append(
        f"{len(recent)} failed or fell back in the last {RECENT_SECONDS / 60:g} minutes ({len(failures)} kept)"
    )
    return lines


# -- the command -------------------------------------------------------------------------------------------
def _look(args: argparse.Namespace, key: str | None, colour: bool) -> tuple[int, str]:
    """One look: (the exit status it gives, the text to show). The verdict is known before anything is shown,
    so a Ctrl-C right after a line was printed exits with that line's verdict."""
    try:
        snapshot = asyncio.run(fetch(args.url, key))
    except Unreachable as exc:
        if args.json:
            return EXIT_CODES[UNREACHABLE], json.dumps({"status": UNREACHABLE, "url": args.url, "error": str(exc)})
        return EXIT_CODES[UNREACHABLE], f"manaproxy {args.url}  {_paint(UNREACHABLE, colour)}: {exc}"
    status, reasons = assess(snapshot)
    if args.json:
        document = {
            "status": status,
            "reasons": reasons,
            "url": args.url,
            "health": snapshot.health,
            "aliases": snapshot.aliases,
            "failures": snapshot.failures["failures"],
        }
        return EXIT_CODES[status], json.dumps(document, indent=None if args.watch else 2)
    return EXIT_CODES[status], "\n".join(render(snapshot, args.url, colour=colour))


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run `manaproxy status`; the exit status."""
    key = client_key(args.key_env)
    tty = out.isatty()
    colour = tty and not os.environ.get("NO_COLOR") and not args.json
    code = EXIT_CODES[UNREACHABLE]
    try:
        while True:
            if args.watch and not args.json:
                out.write("\x1b[H\x1b[2J" if tty else "\n")  # redraw in place on a terminal
            code, text = _look(args, key, colour)
            print(text, file=out, flush=True)
            if not args.watch:
                return code
            time.sleep(WATCH_SECONDS)
    except KeyboardInterrupt:
        return code
    except BrokenPipeError:  # `manaproxy status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return code
