"""Breaker news across processes and hosts (`health: {shared: true}`), through the one Redis connection.

Rule of this module: news is told and heard beside requests, never in their way, and local health stays
authoritative. What this process sees first-hand (`HealthTracker` news listener: a breaker opening, a rate
limit, a breaker closing) is published on the Redis channel `CHANNEL` in the background; every message on it
from another instance is applied to the tracker (`HealthTracker.apply_news`, which bounds and scopes it), and
our own (same instance id, one per process) are ignored. Redis down or slow: nothing is published or heard,
each process goes on with what it sees itself; the link logs one WARNING per outage and every publish that did
not run, and every broken subscription, is counted in `mana_llm_redis_errors_total{feature="health"}`.
What is going on now is also kept in one Redis hash (`STATE_KEY`: a field per breaker or rate limit told, with
when it ends; an "up" deletes its field; the hash expires `backoff_seconds` after its last write), read once
each time the subscription is made: a process that starts, or that was cut off, catches up with the outages the
others know of (pub/sub alone keeps nothing).

The machinery runs for the application's lifetime when `health.shared` is set at startup (`shared_health`, a
cleanup_ctx after the Redis link's); a reload that changes it takes effect at the next restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .gateway import GATEWAY, Gateway
from .health.news import EVENTS, RATE_LIMITED, UP, Message, News, decode, encode, upstream_digest
from .redislink import Degraded

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

FEATURE = "health"  # `feature` label of `mana_llm_redis_errors_total`
CHANNEL = "manaproxy:health:v1"
STATE_KEY = "manaproxy:health:v1:state"
_MAX_PENDING = 256  # publishes waiting at once; past it news is dropped (Redis is slow: it would be late anyway)


class SharedHealth(Collector):
    """Publishes this process's first-hand breaker news and applies the others'."""

    def __init__(self, gateway: Gateway, instance: str | None = None) -> None:
        self.gateway = gateway
        self.instance = instance or secrets.token_hex(8)  # who we are on the channel (no host name, no pid)
        self.sent: dict[str, int] = {}  # event -> news published
        self.heard: dict[str, int] = {}  # event -> news from others that changed something here
        self._pending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<SharedHealth {self.instance} sent={self.sent} heard={self.heard}>"

    def tell(self, news: News) -> None:
        """News listener of the tracker: publish `news` in the background (dropped while Redis is known down)."""
        provider = self.gateway.config.providers.get(news.provider)
        if provider is None:
            return
        if len(self._pending) >= _MAX_PENDING:
            self.gateway.redis.skipped(FEATURE)
            return
        digest = upstream_digest(provider)
        data = encode(Message(news, self.instance, digest))
        # The news's place in the state hash: one field per breaker, and one per rate limit.
        state = RATE_LIMITED if news.event == RATE_LIMITED else "breaker"
        field = orjson.dumps([digest, news.provider, news.model, news.kind, state])
        until = time.time() + news.seconds
        backoff = self.gateway.config.health.backoff_seconds
        self._background(self._publish(data, news.event, field, until, backoff))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, data: bytes, event: str, field: bytes, until: float, backoff: float) -> None:
        async def command(client: aioredis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            if event == UP:
                pipe.hdel(STATE_KEY, field)
            else:
                pipe.hset(STATE_KEY, field, b"%.3f %s" % (until, data))
                pipe.pexpire(STATE_KEY, int((backoff + 1) * 1000))
            pipe.publish(CHANNEL, data)  # last: whoever hears it and then reads the state finds it there
            return await pipe.execute()

        result = await self.gateway.redis.run(FEATURE, command, write=True)
        if not isinstance(result, Degraded):
            self.sent[event] = self.sent.get(event, 0) + 1

    async def _catch_up(self) -> None:
        """Apply what the state hash says is going on now (news told before we listened)."""
        state = await self.gateway.redis.run(FEATURE, lambda client: client.hgetall(STATE_KEY))
        if isinstance(state, Degraded):
            return
        now = time.time()
        over = []
        for field, value in state.items():
            until, _, data = (value.encode() if isinstance(value, str) else value).partition(b" ")
            message = decode(data)
            try:
                left = float(until) - now
            except ValueError:
                left = 0.0
            if message is not None and left > 0:
                self._apply(Message(replace(message.news, seconds=left), message.origin, message.upstream))
            else:
                over.append(field)
        if over:  # windows that ended without an "up" (its teller stopped, or it was a rate limit)
            await self.gateway.redis.run(FEATURE, lambda client: client.hdel(STATE_KEY, *over), write=True)

    def hear(self, data: bytes) -> None:
        """A message on the channel: applied when it is another instance's news of an upstream we know by that
        name; anything else is ignored."""
        message = decode(data)
        if message is not None:
            self._apply(message)

    def _apply(self, message: Message) -> None:
        if message.origin == self.instance:
            return
        news = message.news
        provider = self.gateway.config.providers.get(news.provider)
        if provider is None or upstream_digest(provider) != message.upstream:
            return
        try:
            changed = self.gateway.health.apply_news(news, message.origin)
        except Exception:  # a bug here must not end the subscription
            logger.exception("applying health news failed")
            return
        if changed:
            self.heard[news.event] = self.heard.get(news.event, 0) + 1

    def subscribed(self) -> None:
        logger.info("health news: listening on redis as instance %s", self.instance)
        self._background(self._catch_up())

    def collect(self) -> Iterator[CounterMetricFamily]:
        """`mana_llm_health_news_total{direction,event}`: news published (`sent`) and news from other instances
        that changed something here (`heard`)."""
        family = CounterMetricFamily(
            "mana_llm_health_news",
            "Breaker news (health.shared): published by this process (sent), from others applied here (heard)",
            labels=["direction", "event"],
        )
        for direction, counts in (("sent", self.sent), ("heard", self.heard)):
            for event in EVENTS:
                family.add_metric([direction, event], counts.get(event, 0))
        yield family

    async def close(self) -> None:
        """Let the publishes under way finish (each is bounded by the Redis timeout)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


SHARED_HEALTH = web.AppKey("shared_health", SharedHealth)


async def shared_health(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: with `health.shared` (and the Redis link open), tell and hear breaker news for the
    application's lifetime."""
    shared = app[SHARED_HEALTH]
    gateway = shared.gateway
    if not gateway.config.health.shared or not gateway.redis.configured:
        yield
        return
    gateway.health.add_news_listener(shared.tell)
    listener = asyncio.create_task(
        gateway.redis.listen(FEATURE, CHANNEL, shared.hear, shared.subscribed), name="manaproxy-health-news"
    )
    yield
    gateway.health.remove_news_listener(shared.tell)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await shared.close()


def install(app: web.Application) -> SharedHealth:
    """Set up the shared health of `app` (its machinery runs only when `health.shared` is set at startup)."""
    shared = SharedHealth(app[GATEWAY])
    app[SHARED_HEALTH] = shared
    app.cleanup_ctx.append(shared_health)
    return shared
