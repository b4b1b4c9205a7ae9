"""Active health probes: every `probe_interval_seconds`, all configured providers in parallel.

Each probe is bounded by `probe_timeout_seconds` and spends no tokens (`GET {base_url}/models`, or the
provider's configured `probe` path). One failing or hanging probe never stalls the others or the loop:
every probe is its own task under its own timeout, a round starts them and does not wait for them, and
a provider whose previous probe is still running is simply left out of the next round. Exceptions are
translated into health outcomes, never propagated. The first round runs right at startup, and a
successful reload starts a round at once so new or changed providers do not wait a whole interval.

Between rounds, a provider whose breaker is open is probed as soon as its recovery probe is due (1 s,
2 s, 4 s … after it opened, see `health/breaker.py`), so a provider back after a short restart is noticed in
about a second rather than at the end of `backoff_seconds`. So is a provider one of whose requests got
401/403: its probe, with our key, tells whether the key is refused (the provider's breaker opens) or only
that model or request (`health/tracker.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from functools import partial

from aiohttp import web

from .gateway import GATEWAY, Gateway
from .providers.base import Provider, UpstreamFailure
from .reload import RELOADER

logger = logging.getLogger(__name__)


async def probe_one(gateway: Gateway, provider: Provider, timeout: float) -> None:
    """Probe one provider and feed the outcome to the health tracker. Never raises (but cancellation).

    A reload during the probe may remove the provider or point it elsewhere: the slot then drops the
    outcome, which is about an upstream the config no longer names.
    """
    with gateway.health.attempt(provider.config, probe=True) as slot:
        try:
            async with asyncio.timeout(timeout):
                await provider.probe(timeout)
        except UpstreamFailure as failure:
            slot.failed(failure)
        except TimeoutError:
            slot.failed(UpstreamFailure.timeout(f"timed out after {timeout:g}s"))
        except Exception as exc:  # a provider bug must not stop the loop
            logger.debug("probe of %s raised", provider.config.name, exc_info=True)
            slot.failed(UpstreamFailure.internal(type(exc).__name__, probe=True))
        else:
            slot.succeeded()


class Prober:
    """Probes every configured provider each interval, and providers whose breaker is open as soon as a
    recovery probe is due (`Breaker.probe_at`); at most one probe per provider runs at a time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._round_now = True  # the first round runs at startup

    def __repr__(self) -> str:
        return f"<Prober running={sorted(self._running)}>"

    def start_round(self, names: Iterable[str] | None = None) -> list[asyncio.Task[None]]:
        """Start a probe for every configured provider (of `names`, if given) that has none running."""
        runtime = self.gateway.runtime
        timeout = runtime.config.health.probe_timeout_seconds
        wanted = None if names is None else set(names)
        started = []
        for name, spec in runtime.config.providers.items():
            if not spec.configured or name in self._running or (wanted is not None and name not in wanted):
                continue
            task = asyncio.create_task(
                probe_one(self.gateway, runtime.providers[name], timeout), name=f"manaproxy-probe-{name}"
            )
            self._running[name] = task
            task.add_done_callback(partial(self._finished, name))
            started.append(task)
        return started

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        if self._running.get(name) is task:
            del self._running[name]
        if not task.cancelled() and task.exception() is not None:
            logger.error("probe of %s failed", name, exc_info=task.exception())
        self._wake.set()  # a recovery probe that failed has scheduled the next one

    def wake(self, result: str = "success") -> None:
        """Reload listener: after a successful reload, probe right away."""
        if result == "success":
            self._round_now = True
            self._wake.set()

    def on_transition(self, provider: str, healthy: bool) -> None:
        """Health listener: a breaker that opens wants its first recovery probe soon."""
        if not healthy:
            self._wake.set()

    def on_probe_wanted(self, provider: str) -> None:
        """Health listener: a provider wants a credential check now."""
        self._wake.set()

    async def run(self) -> None:
        """Probe forever: a round at once and every `probe_interval_seconds` (read each time), and the
        recovery probes of open breakers whenever they are due."""
        health = self.gateway.health
        next_round = 0.0
        while True:
            self._wake.clear()
            now = health.now()
            try:
                if self._round_now or now >= next_round:
                    self._round_now = False
                    next_round = now + self.gateway.config.health.probe_interval_seconds
                    self.start_round()
                else:
                    due, _ = health.recovery_probes()
                    if due:
                        self.start_round(due)
            except Exception:
                logger.exception("probe round failed")
            _, later = health.recovery_probes()
            wake_at = next_round if later is None else min(next_round, later)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake_at - health.now())):
                    await self._wake.wait()

    async def close(self) -> None:
        """Cancel the probes still running."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def probe_loop(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the probe loop for the application's lifetime."""
    gateway = app[GATEWAY]
    listeners = app[RELOADER].listeners
    prober = Prober(gateway)
    listeners.append(prober.wake)
    gateway.health.add_listener(prober.on_transition)
    gateway.health.add_probe_listener(prober.on_probe_wanted)
    task = asyncio.create_task(prober.run(), name="manaproxy-probes")
    yield
    listeners.remove(prober.wake)
    gateway.health.remove_listener(prober.on_transition)
    gateway.health.remove_probe_listener(prober.on_probe_wanted)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await prober.close()
