"""Reloading `aliases.yaml`: on SIGHUP (`schedule`) or when asked (`reload`).

The reload invariant lives here and in `Gateway.apply`: a new config is read and validated whole before
anything changes; a bad file never replaces a good one and never stops the process (the reason is logged
and the old config keeps serving); a good one is swapped in with one reference, so requests in flight
keep the config they started with. systemd hears `RELOADING=1` … `READY=1` around each reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .config import RESTART_ONLY_SETTINGS, ConfigError, load_config
from .gateway import Gateway
from .systemd import notify

logger = logging.getLogger("manaproxy.reload")  # pinned: deploy/README.md documents it

SUCCESS = "success"
FAILURE = "failure"

ReloadListener = Callable[[str], None]

# How many reload outcomes `Reloader.recent` keeps (the status page and `/v1/health` show them).
RECENT_RELOADS = 10


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """One reload attempt, for people: when, how it went, and why a rejected one was rejected."""

    time_unix: float
    result: str  # SUCCESS or FAILURE
    error: str | None = None  # the rejection's place and reason, keys redacted (as its log line)


class Reloader:
    """Reloads the gateway's config from disk and tells its listeners how it went."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # Called with SUCCESS or FAILURE after each attempt (metrics count them; probes start a round).
        self.listeners: list[ReloadListener] = []
        self.recent: deque[ReloadOutcome] = deque(maxlen=RECENT_RELOADS)  # oldest first
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Reloader {self.gateway!r} pending={len(self._tasks)}>"

    def reload(self, path: str) -> bool:
        """Re-read `path`; swap it in if valid, else keep the current config. Never raises."""
        error = None
        try:
            config = load_config(path)
            before = self.gateway.config.server
            redis_before = self.gateway.config.redis
            shared_before = self.gateway.config.health.shared
            self.gateway.apply(config)
        except ConfigError as exc:
            logger.error("reload rejected, keeping the previous config: %s", exc)
            result, error = FAILURE, str(exc)
        except Exception as exc:
            logger.exception("reload failed, keeping the previous config")
            result, error = FAILURE, f"internal error: {type(exc).__name__}"
        else:
            logger.info("reloaded %s", config.summary())
            for name in RESTART_ONLY_SETTINGS:
                if getattr(before, name) != getattr(config.server, name):
                    logger.warning("server.%s changed: it takes effect at the next restart", name)
            if redis_before != config.redis:  # the one Redis connection is opened at startup (redislink.py)
                logger.warning("redis: changed: it takes effect at the next restart")
            if shared_before != config.health.shared:  # the news machinery starts with the process
                logger.warning("health.shared changed: it takes effect at the next restart")
            result = SUCCESS
        if error is not None:
            error = self.gateway.redactor.line(error, limit=500)
        self.recent.append(ReloadOutcome(time.time(), result, error))
        for listener in self.listeners:
            try:
                listener(result)
            except Exception:
                logger.exception("reload listener %r failed", listener)
        return result == SUCCESS

    def schedule(self, path: str) -> None:
        """SIGHUP handler: only schedules the reload, which runs (and logs) in the event loop."""
        task = asyncio.get_running_loop().create_task(self._reload_notifying(path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_notifying(self, path: str) -> None:
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        logger.info("SIGHUP: reloading %s", path)
        ok = self.reload(path)
        status = f"serving {self.gateway.config.summary()}" if ok else "reload rejected; serving the previous config"
        notify(f"READY=1\nSTATUS={status}")


RELOADER = web.AppKey("reloader", Reloader)
