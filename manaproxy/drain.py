"""The shutdown drain: the requests in flight, and how they end when the drain runs out of time.

On SIGTERM `manaproxy serve` stops listening and gives the requests in flight up to
`server.shutdown_timeout_seconds` to finish. Those still running then are cut at once (`Drain.cut`), each
ended the way its protocol ends cleanly: a stream that has begun gets an error event
(`code: "shutting_down"`) and a proper end of body, a request not yet answered an OpenAI-shaped 503 with
`Retry-After`. So the drain takes the setting at most (plus the moment the cut takes) — aiohttp's own
shutdown waits twice its timeout — and no client sees a broken body. Requests that arrive on connections
still open while draining are refused the same way.

The same bookkeeping tells a reload when the requests that started on the old runtime have all ended
(`requests_ended`), so that its providers are closed only then.

A cut is a cancellation delivered through the request's `Guard` (an `asyncio.Timeout` set to "now"), so
code under it tells a cut (`guard.cut`) from a client that went away (a plain cancellation).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from .errors import ProxyError
from .failures import SHUTTING_DOWN

RETRY_AFTER_SECONDS = 1


def shutting_down() -> ProxyError:
    """The answer to a request that the drain ended before it was answered."""
    return ProxyError(
        503,
        "manaproxy is shutting down; retry (another instance will answer)",
        code=SHUTTING_DOWN,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


class Guard:
    """One request's place in the drain, for as long as its `async with` block runs."""

    __slots__ = ("_drain", "_timeout")

    def __init__(self, drain: Drain) -> None:
        self._drain = drain
        self._timeout = asyncio.timeout(None)

    async def __aenter__(self) -> Guard:
        await self._timeout.__aenter__()
        self._drain._join(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._drain._leave(self)
        # A cut that went unhandled below comes out of here as a TimeoutError.
        await self._timeout.__aexit__(exc_type, exc, tb)

    @property
    def cut(self) -> bool:
        """Whether the drain ended this request (then the cancellation it sees is that, not a client leaving)."""
        return self._timeout.expired()

    def fire(self) -> None:
        self._timeout.reschedule(asyncio.get_running_loop().time())


class Drain:
    """The requests in flight; `stopping` once a shutdown has begun."""

    def __init__(self) -> None:
        self._guards: set[Guard] = set()
        self._idle: asyncio.Event | None = None  # set when the last request leaves (made when first awaited)
        # `requests_ended`: the requests each future still waits for.
        self._waiters: list[tuple[set[Guard], asyncio.Future[None]]] = []
        self.stopping = False

    def __repr__(self) -> str:
        return f"<Drain in_flight={len(self._guards)} stopping={self.stopping}>"

    @property
    def in_flight(self) -> int:
        return len(self._guards)

    def guard(self) -> Guard:
        """`async with drain.guard() as guard:` around one request's work."""
        return Guard(self)

    def _join(self, guard: Guard) -> None:
        self._guards.add(guard)

    def _leave(self, guard: Guard) -> None:
        self._guards.discard(guard)
        if not self._guards and self._idle is not None:
            self._idle.set()
        if self._waiters:
            self._waiters = [(waiting, future) for waiting, future in self._waiters if _still(waiting, future, guard)]

    def requests_ended(self) -> asyncio.Future[None]:
        """A future done once every request in flight now has ended (at once when none is); requests that
        start later do not delay it. A reload waits on it before closing what the old runtime held."""
        future = asyncio.get_running_loop().create_future()
        if self._guards:
            self._waiters.append((set(self._guards), future))
        else:
            future.set_result(None)
        return future

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most `timeout` seconds; True if none is left."""
        if self._guards:
            self._idle = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            except TimeoutError:
                pass
        return not self._guards

    def cut(self) -> int:
        """End every request in flight now (see the module rule); returns how many there were."""
        guards = list(self._guards)
        for guard in guards:
            guard.fire()
        return len(guards)


def _still(waiting: set[Guard], future: asyncio.Future[None], left: Guard) -> bool:
    """Whether `future` still waits for requests now that `left` has ended (resolving it when not)."""
    waiting.discard(left)
    if future.done():  # cancelled: its waiter is gone
        return False
    if waiting:
        return True
    future.set_result(None)
    return False
