"""Shared fixtures: fake upstreams and a real manaproxy server on loopback.

    async def test_x(make_upstream, make_proxy):
        up = await make_upstream("a")
        proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))
        resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/x", "messages": []})

`proxy.base_url` (`http://127.0.0.1:PORT/v1`) is what the openai SDK gets as `base_url`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from manaproxy.app import create_app
from manaproxy.config import Config, parse_config
from manaproxy.gateway import GATEWAY, Gateway
from manaproxy.reload import RELOADER, Reloader
from manaproxy.server import Runner

from .fakes import FakeUpstream
from .processes import ServeProcess


def build_config(
    providers: Mapping[str, FakeUpstream | str | Mapping[str, Any]],
    aliases: Mapping[str, Sequence[str] | Mapping[str, Any]] | None = None,
    *,
    default: str | None = None,
    health: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
) -> str:
    """YAML text for a config. A provider given as a FakeUpstream or URL becomes `{base_url: ...}`."""
    provider_specs: dict[str, Any] = {}
    for name, spec in providers.items():
        if isinstance(spec, FakeUpstream):
            provider_specs[name] = {"base_url": spec.base_url}
        elif isinstance(spec, str):
            provider_specs[name] = {"base_url": spec}
        else:
            provider_specs[name] = {
                key: (value.base_url if isinstance(value, FakeUpstream) else value) for key, value in spec.items()
            }
    alias_specs = {
        name: ({"chain": list(spec)} if not isinstance(spec, Mapping) else dict(spec))
        for name, spec in (aliases or {}).items()
    }
    raw: dict[str, Any] = {"providers": provider_specs, "aliases": alias_specs}
    if default is not None:
        raw["default"] = default
    # Tests want breakers that do not open behind their back unless they ask for it.
    raw["health"] = {"failure_threshold": 100, "backoff_seconds": 60, **(health or {})}
    if server is not None:
        raw["server"] = dict(server)
    return yaml.safe_dump(raw, sort_keys=False)


class ProxyTestServer(TestServer):
    """aiohttp's test server running the app on manaproxy's own `Runner`, as `manaproxy serve` does."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return Runner(self.app, **kwargs)


@dataclass
class Proxy:
    client: TestClient[web.Request, web.Application]
    app: web.Application
    registry: CollectorRegistry
    config: Config

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def reloader(self) -> Reloader:
        return self.app[RELOADER]

    @property
    def base_url(self) -> str:
        return str(self.client.make_url("/v1"))

    @property
    def root_url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")


@pytest.fixture
async def make_upstream() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    started: list[FakeUpstream] = []

    async def make(name: str = "fake") -> FakeUpstream:
        upstream = await FakeUpstream(name).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        await upstream.close()


@pytest.fixture
def make_proxy(aiohttp_client: Any) -> Callable[..., Awaitable[Proxy]]:
    async def make(
        config_text: str,
        *,
        env: Mapping[str, str] | None = None,
        api_keys: Sequence[bytes] = (),
        cors_origins: Sequence[str] = (),
        probes: bool = False,
    ) -> Proxy:
        config = parse_config(config_text, env=dict(env or {}), source="test.yaml")
        registry = CollectorRegistry()
        app = create_app(config, api_keys=api_keys, cors_origins=cors_origins, registry=registry, probes=probes)
        client = await aiohttp_client(ProxyTestServer(app))
        return Proxy(client=client, app=app, registry=registry, config=config)

    return make


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServeProcess]]]:
    started: list[ServeProcess] = []

    async def start(config_text: str, *, wait: bool = True, **extra_env: str) -> ServeProcess:
        path = tmp_path / "aliases.yaml"
        path.write_text(config_text)
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "MANAPROXY_API_KEYS", "PORT")}
        env.update({"LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1", **extra_env})
        process = ServeProcess(path, env)
        started.append(process)
        return await process.start(wait=wait)

    yield start
    for process in started:
        await process.stop()
