"""The one Redis connection manaproxy uses (the response cache, client limits, shared health news).

Rule of this module: Redis is never in the way. Every command is bounded by `redis.timeout_seconds`;
when Redis is down, slow or refuses a command (full, read-only ...), the caller gets `DEGRADED` back —
never an exception, never a wait past the timeout — and goes on without the feature. One command that times
out costs that command only (one slow answer, a large entry, says nothing about the next command), but
`DOWN_AFTER_TIMEOUTS` in a row with no answer between are a Redis that answers nothing (stopped, a network
that drops packets): like a connection failure, they mark the link down. "In a row" means one after the
other: the commands in flight during one stall (a fork, a large value, a pause of our own loop) time out
together and count once — each counted timeout must have been sent after the one before it timed out. From then on commands return
`DEGRADED` at once, without touching the network, while one background task pings Redis until it answers
(reconnection is never paid for by a request, nor is a timeout per command of a Redis that is gone). An outage
is logged once as a WARNING when it starts and once as an INFO when it ends (for Redis refusing writes,
full or read-only: when a write succeeds again); each command that did not run is counted per feature
(`errors`, exported as `mana_llm_redis_errors_total{feature}`). The URL may hold a password: only
`RedisSettings.redacted_url` is ever shown.

A subscription (`listen`, for news other processes publish) is a background task of the feature that wants
it, on a connection of its own: it never waits in a request's way. A subscription that breaks marks the link
down like a failed command (the same one WARNING) and is made again once the link is back.

The `redis` package is imported only when a URL is configured (it costs ≈8 MB and 0.1 s that a process
without Redis need not pay). The link is opened once at startup (`app.shared_redis`, a cleanup_ctx) from
the `redis:` section and closed at shutdown; a reload that changes `redis:` takes effect at the next restart,
and one that turns a feature on where no link was opened is refused (`Gateway.apply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import TYPE_CHECKING, TypeVar

from .config import RedisSettings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger("manaproxy.redis")

T = TypeVar("T")


class Degraded(enum.Enum):
    """What a command returns when it did not run: the caller goes on without the feature."""

    DEGRADED = "degraded"


DEGRADED = Degraded.DEGRADED

# The background task's pace while Redis is down, and how long its ping may take (at least the commands').
RECONNECT_SECONDS = 0.5
# Commands timed out in a row, no answer between, that mark the link down (one slow command does not).
DOWN_AFTER_TIMEOUTS = 3
_PING_TIMEOUT_FLOOR = 1.0
# How often a subscription that hears nothing looks whether the link went down meanwhile (then it is made
# again once the link is back: a silent connection may be one that is gone).
LISTEN_POLL_SECONDS = 1.0


class RedisLink:
    """The shared Redis client with its outage state; unconfigured (every command `DEGRADED`) until `open`."""

    def __init__(self) -> None:
        self.settings = RedisSettings()
        self.errors: dict[str, int] = {}  # feature -> commands that did not run (failed, timed out, skipped)
        self._client: aioredis.Redis | None = None
        self._down_since: float | None = None  # monotonic; set while the link is down (no command is sent)
        self._timeouts_in_a_row = 0  # commands timed out one after the other since Redis last answered
        self._streak_at = 0.0  # monotonic: when the last counted timeout came (one sent before it is its twin)
        self._refusing = False  # Redis refuses commands (full ...): warned once, until a write succeeds
        self._reconnect: asyncio.Task[None] | None = None
        # What a failed command raises, once the `redis` package is imported (`open`): the link is down, or
        # Redis answered with a refusal.
        self._unreachable: tuple[type[BaseException], ...] = (TimeoutError, OSError)
        self._timeouts: tuple[type[BaseException], ...] = (TimeoutError,)
        self._refusals: tuple[type[BaseException], ...] = ()

    def __repr__(self) -> str:
        state = "unconfigured" if self._client is None else ("down" if self._down_since is not None else "up")
        return f"<RedisLink {self.settings.redacted_url or '-'} {state} errors={self.errors}>"

    @property
    def configured(self) -> bool:
        return self._client is not None

    @property
    def up(self) -> bool:
        """Configured, and not known to be down (a command may still time out)."""
        return self._client is not None and self._down_since is None

    def open(self, settings: RedisSettings) -> None:
        """Create the client for `settings.url` (connections are made on first use); no URL: stay unconfigured."""
        self.settings = settings
        if not settings.url:
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._unreachable = (TimeoutError, OSError, RedisConnectionError, RedisTimeoutError)
        self._timeouts = (TimeoutError, RedisTimeoutError)
        self._refusals = (RedisError,)
        self._client = aioredis.Redis.from_url(
            settings.url,
            socket_timeout=settings.timeout_seconds,
            socket_connect_timeout=max(settings.timeout_seconds, _PING_TIMEOUT_FLOOR),
            retry=Retry(NoBackoff(), 0),  # one try per command: the timeout is ours, and a retry is a wait
            health_check_interval=0,
        )
        logger.info("redis: using %s (commands time out after %gs)", settings.redacted_url, settings.timeout_seconds)

    async def close(self) -> None:
        """Stop reconnecting and close the connections (once, at shutdown)."""
        if self._reconnect is not None:
            self._reconnect.cancel()
            await asyncio.gather(self._reconnect, return_exceptions=True)
            self._reconnect = None
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(*self._refusals, *self._unreachable):  # a connection that is already gone
                await client.aclose()

    async def run(
        self, feature: str, command: Callable[[aioredis.Redis], Awaitable[T]], *, write: bool = False
    ) -> T | Degraded:
        """Run `command` on the client within the timeout: its result, or `DEGRADED` (counted for `feature`).
        `write`: the command writes (a refusal to write — Redis full, a read-only replica — ends only when a
        write succeeds again: reads answering meanwhile say nothing about it)."""
        client = self._client
        if client is None or self._down_since is not None:
            self._count(feature)
            return DEGRADED
        sent = monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                result = await command(client)
        except self._timeouts as exc:  # slow (Redis busy, a large value): the link is not down for one
            self._count(feature)
            if self._down_since is None and sent >= self._streak_at:
                self._timeouts_in_a_row += 1
                self._streak_at = monotonic()
                if self._timeouts_in_a_row >= DOWN_AFTER_TIMEOUTS:
                    self._went_down(exc, f"{self._timeouts_in_a_row} commands in a row timed out")
                    return DEGRADED
            logger.debug("redis %s: a %s command timed out", self.settings.redacted_url, feature)
            return DEGRADED
        except self._unreachable as exc:
            self._count(feature)
            self._went_down(exc)
            return DEGRADED
        except self._refusals as exc:  # Redis answered, but refused: full (OOM), read-only replica, ...
            self._timeouts_in_a_row = 0
            self._count(feature)
            self._refused(exc)
            return DEGRADED
        self._timeouts_in_a_row = 0
        if write and self._refusing:
            self._refusing = False
            logger.info("redis %s: writes succeed again", self.settings.redacted_url)
        return result

    async def listen(
        self,
        feature: str,
        channel: str,
        on_message: Callable[[bytes], None],
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        """Hand every message published on `channel` to `on_message`, until cancelled (run it as a task of its
        own). While the link is down it waits for it to be back, then subscribes again; `on_subscribed` runs
        after each subscription (what was published meanwhile is lost: pub/sub keeps nothing). A subscription
        that breaks is counted for `feature` and marks the link down. `on_message` must not raise."""
        task = asyncio.current_task()
        while self._client is not None:
            client = self._client
            if self._down_since is not None:
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(max(self.settings.timeout_seconds, _PING_TIMEOUT_FLOOR)):
                    await pubsub.subscribe(channel)
                if on_subscribed is not None:
                    on_subscribed()
                while self._down_since is None:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_POLL_SECONDS)
                    if message is not None and message.get("type") == "message":
                        on_message(message["data"])
            except (*self._unreachable, *self._refusals) as exc:
                if task is not None and task.cancelling():  # redis-py may report a cancellation as a lost connection
                    raise asyncio.CancelledError from exc
                self._count(feature)
                self._went_down(exc)
            finally:
                with contextlib.suppress(*self._refusals, *self._unreachable):
                    await pubsub.aclose()

    def skipped(self, feature: str) -> None:
        """Count a command `feature` chose not to send (a queue of its own full ...)."""
        self._count(feature)

    def _count(self, feature: str) -> None:
        self.errors[feature] = self.errors.get(feature, 0) + 1

    def _went_down(self, exc: BaseException, why: str | None = None) -> None:
        if self._down_since is not None:
            return
        self._down_since = monotonic()
        self._timeouts_in_a_row = 0
        logger.warning(
            "redis %s is unreachable (%s): features that use it go on without it until it is back",
            self.settings.redacted_url,
            why or _describe(exc),
        )
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop(), name="manaproxy-redis")

    def _refused(self, exc: BaseException) -> None:
        if not self._refusing:
            self._refusing = True
            logger.warning(
                "redis %s refused a command (%s): features that use it go on without it",
                self.settings.redacted_url,
                _describe(exc),
            )

    async def _reconnect_loop(self) -> None:
        """Ping Redis every `RECONNECT_SECONDS` until it answers, then let commands through again."""
        client = self._client
        assert client is not None
        timeout = max(self.settings.timeout_seconds, _PING_TIMEOUT_FLOOR)
        while True:
            await asyncio.sleep(RECONNECT_SECONDS)
            try:
                async with asyncio.timeout(timeout):
                    await client.ping()
            except (*self._unreachable, *self._refusals):
                continue
            down_for = monotonic() - (self._down_since or monotonic())
            self._down_since = None
            self._timeouts_in_a_row = 0
            self._streak_at = monotonic()  # a command sent before now that times out is the outage's
            self._reconnect = None
            logger.info("redis %s is back after %.1fs", self.settings.redacted_url, down_for)
            return


def _describe(exc: BaseException) -> str:
    """A short reason for the log: the exception's type and first line, never a URL (it may hold a password)."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
