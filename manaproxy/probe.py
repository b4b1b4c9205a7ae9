"""Active health probes: every `probe_interval_seconds`, all configured providers in parallel.

Each probe is bounded by `probe_timeout_seconds` and spends no tokens (`GET {base_url}/models`, or the
provider's configured `probe` path). One failing or hanging probe never stalls the others or the loop:
each runs under its own timeout and its exceptions are translated, never propagated. The first round
runs right at startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from time import perf_counter

from aiohttp import web

from .state import GATEWAY, Gateway
from .upstream import Provider, UpstreamFailure

logger = logging.getLogger(__name__)


async def probe_one(gateway: Gateway, provider: Provider, timeout: float) -> None:
    """Probe one provider and feed the outcome to the health tracker."""
    name = provider.config.name
    started = perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await provider.probe(timeout)
    except UpstreamFailure as failure:
        detail = f"probe: {failure.detail}"
        if failure.retry_after is not None:
            gateway.health.record_rate_limited(name, failure.retry_after, detail)
            return
        if not failure.provider_fault:
            gateway.health.record_neutral(name, detail)
            return
        outcome: str | None = detail
    except TimeoutError:
        outcome = f"probe: timed out after {timeout:g}s"
    except Exception as exc:  # a provider bug must not stop the loop
        outcome = f"probe: {type(exc).__name__}"
        logger.debug("probe of %s raised", name, exc_info=True)
    else:
        outcome = None
    if outcome is None:
        gateway.health.record_success(name, perf_counter() - started)
    else:
        gateway.health.record_failure(name, outcome)


async def probe_round(gateway: Gateway) -> None:
    """Probe every configured provider once, in parallel."""
    runtime = gateway.runtime
    timeout = runtime.config.health.probe_timeout_seconds
    probes = [
        probe_one(gateway, runtime.providers[name], timeout)
        for name, spec in runtime.config.providers.items()
        if spec.configured
    ]
    await asyncio.gather(*probes, return_exceptions=True)


async def probe_loop(gateway: Gateway) -> None:
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await probe_round(gateway)
        except Exception:
            logger.exception("probe round failed")
        interval = gateway.runtime.config.health.probe_interval_seconds
        elapsed = asyncio.get_running_loop().time() - started
        await asyncio.sleep(max(0.0, interval - elapsed))


async def probe_loop_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the probe loop for the application's lifetime."""
    task = asyncio.create_task(probe_loop(app[GATEWAY]), name="manaproxy-probes")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
