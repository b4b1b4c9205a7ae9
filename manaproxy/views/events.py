"""`GET /v1/events`: a server-sent event stream of what changes, for the status page and other watchers.

Three kinds of event, each `event: <kind>` and one `data:` line of JSON:
- `transition`: a provider's breaker opened or closed (`{"time_unix", "provider", "status"}`);
- `failure`: a request failed or fell back (an item of `/v1/failures`);
- `reload`: a reload was applied or rejected (an item of `/v1/health`'s `reloads`).
A comment line every `HEARTBEAT_SECONDS` keeps idle connections (and the proxies between) open.

Rule of this module: bounded and cheap. At most `server.max_event_clients` streams are open at once (past
it a 503 with `Retry-After`); each has a queue of `QUEUE_EVENTS` events; a publisher encodes an event once
and never waits: a stream whose queue is full (its reader is slow or gone) is dropped — its connection
aborted — rather than buffered without end. Nothing is published per chunk: transitions, finished records
and reloads only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from ..drain import shutting_down
from ..errors import ProxyError
from ..gateway import GATEWAY, Gateway
from ..reload import Reloader
from .failures import RecentFailures

logger = logging.getLogger(__name__)

QUEUE_EVENTS = 1024  # events waiting for one stream; past it the stream is dropped
HEARTBEAT_SECONDS = 15.0
RETRY_AFTER_SECONDS = 10  # a stream refused for the client limit: when to try again
_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


class Subscriber:
    """One open stream: its queue of encoded events (`None` ends it) and its connection."""

    __slots__ = ("queue", "transport")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_EVENTS)
        self.transport = transport

    def end(self) -> None:
        """Ask the stream to end: what is still queued is dropped, the end marker goes in."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventHub:
    """The open streams, and the one way an event reaches them all."""

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        self.dropped = 0  # streams dropped for reading too slowly (since start)
        self.closed = False

    def __repr__(self) -> str:
        return f"<EventHub streams={len(self.subscribers)} dropped={self.dropped}>"

    def subscribe(self, limit: int, transport: asyncio.Transport | None) -> Subscriber | None:
        """A new stream, or None when `limit` are open already (or the server is stopping)."""
        if self.closed or len(self.subscribers) >= limit:
            return None
        subscriber = Subscriber(transport)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Queue the event on every stream; a stream whose queue is full is dropped. Never waits."""
        if not self.subscribers:
            return
        event = b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for subscriber in list(self.subscribers):
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.drop(subscriber)

    def drop(self, subscriber: Subscriber) -> None:
        """A reader too slow to keep up: its connection is aborted (a write it is blocked in ends too)."""
        self.dropped += 1
        self.subscribers.discard(subscriber)
        logger.info("event stream dropped: %d events waiting for a slow reader", QUEUE_EVENTS)
        subscriber.end()
        if subscriber.transport is not None:
            subscriber.transport.abort()

    async def close(self, app: web.Application | None = None) -> None:
        """End every stream (on shutdown: they must not hold the drain) and refuse new ones."""
        self.closed = True
        for subscriber in list(self.subscribers):
            subscriber.end()


EVENTS = web.AppKey("events", EventHub)


def connect(hub: EventHub, gateway: Gateway, reloader: Reloader, failures: RecentFailures) -> None:
    """Feed `hub` from the health tracker's transitions, the recent failures and the reloader."""

    def on_transition(provider: str, healthy: bool) -> None:
        status = "healthy" if healthy else "unhealthy"
        hub.publish("transition", {"time_unix": round(time.time(), 3), "provider": provider, "status": status})

    def on_reload(result: str) -> None:
        outcome = reloader.recent[-1]
        hub.publish("reload", {"time_unix": round(outcome.time_unix, 3), "result": result, "error": outcome.error})

    gateway.health.add_listener(on_transition)
    failures.listeners.append(lambda item: hub.publish("failure", item))
    reloader.listeners.append(on_reload)


async def event_stream(request: web.Request) -> web.StreamResponse:
    """`GET /v1/events`: the stream, until the client leaves, reads too slowly, or the server stops."""
    server = request.app[GATEWAY].config.server
    if not server.status_page:
        raise ProxyError(404, "GET /v1/events: the status page is off (server.status_page)", code="not_found")
    hub = request.app[EVENTS]
    transport = request.transport if isinstance(request.transport, asyncio.Transport) else None
    subscriber = hub.subscribe(server.max_event_clients, transport)
    if subscriber is None and hub.closed:
        raise shutting_down()
    if subscriber is None:
        raise ProxyError(
            503,
            f"too many event streams open (server.max_event_clients {server.max_event_clients}); retry later",
            code="too_many_event_clients",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    response = web.StreamResponse(headers=_STREAM_HEADERS)
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n: manaproxy events\n\n")
        queue = subscriber.queue
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    batch = [await queue.get()]
            except TimeoutError:
                batch = [b": keep-alive\n\n"]
            while batch[-1] is not None and not queue.empty():  # what arrived meanwhile goes in one write
                batch.append(queue.get_nowait())
            if len(batch) > 1 or batch[0] is not None:
                await response.write(b"".join(event for event in batch if event is not None))
            if batch[-1] is None:
                break
        return response
    except ConnectionError:  # dropped, or the client went away mid-write
        return response
    finally:
        hub.unsubscribe(subscriber)
