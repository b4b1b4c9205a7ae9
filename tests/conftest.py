"""The test tree's one naming rule: `test_<module>.py` holds a pure module's unit tests and is named after the
module (test_paths.py for manaproxy/paths.py, test_google_answer.py for providers/google/answer.py);
`test_<behaviour>.py` holds end-to-end tests and is named after the behaviour (test_path_confinement.py,
test_provider_health.py). What test modules share lives in helpers.py (functions, classes, constants) and
fakes.py (the fake upstreams and their scripted replies); no test module imports another test module
(test_layers.py checks it).

Fixtures: fake upstreams and a real manaproxy server on loopback, in this process or as `manaproxy serve`;
`node` runs a client script of tests/node/ (the Node openai SDK) and returns the JSON line it prints.

    async def test_x(make_upstream, make_proxy):
        up = await make_upstream("a")
        proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))
        resp = await proxy.client.post(CHAT, json=chat("mana/x"))

`proxy.base_url` (`http://127.0.0.1:PORT/v1`) is what the openai SDK gets as `base_url`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from manaproxy.app import create_app
from manaproxy.config import KINDS, parse_config
from manaproxy.providers.google import GoogleProvider

from .fakes import FAULTY_KIND, FakeGemini, FakeUpstream, chat_answer, chat_completion, json_reply, status_reply
from .helpers import NODE_DIR, NODE_TIMEOUT, Proxy, ProxyTestServer, build_config, node_env
from .processes import RedisServer, ServeProcess


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
        process = ServeProcess(path, env, cwd=tmp_path)  # no `.env` of the checkout's is read
        started.append(process)
        return await process.start(wait=wait)

    yield start
    for process in started:
        await process.stop()


@pytest.fixture
async def gemini() -> AsyncIterator[FakeGemini]:
    fake = await FakeGemini().start()
    yield fake
    await fake.close()


@pytest.fixture
async def make_google_proxy(make_proxy: Any) -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """make_proxy that also closes the google providers' SDK sessions before the loop goes away."""
    proxies: list[Proxy] = []

    async def make(config_text: str, **kwargs: Any) -> Proxy:
        proxy = await make_proxy(config_text, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        for provider in proxy.gateway.runtime.providers.values():
            if isinstance(provider, GoogleProvider):
                await provider.aclose()


@pytest.fixture
async def routed_proxy(make_upstream: Any, make_proxy: Any) -> tuple[FakeUpstream, Proxy]:
    """Providers a, ollama and openrouter (all one fake that answers everything); aliases mana/x (the default)
    and mana/y; a request body limit of 1000 bytes."""
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("whatever"))
    providers = {"a": up, "ollama": up, "openrouter": up}
    aliases = {"mana/x": ["a/m1"], "mana/y": ["a/m2"]}
    proxy = await make_proxy(build_config(providers, aliases, default="mana/x", server={"max_body_bytes": 1000}))
    return up, proxy


@pytest.fixture
async def one(make_upstream, make_proxy):
    """Alias mana/x = [a/m1]: what a provider answers is all the client gets. Returns (a, proxy)."""
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    return a, proxy


@pytest.fixture
async def two(make_upstream, make_proxy):
    """Alias mana/x = [down/m0, up/m1], where down answers 503: every answer is a fallback to up.
    Returns (down, up, proxy)."""
    down = await make_upstream("down")
    up = await make_upstream("up")
    down.default = status_reply(503)
    up.default = chat_answer("m1")
    proxy = await make_proxy(build_config({"down": down, "up": up}, {"mana/x": ["down/m0", "up/m1"]}))
    return down, up, proxy


@pytest.fixture
def faulty_kind(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers the provider kind `faulty` (fakes.FaultyProvider) for this test; returns its name."""
    monkeypatch.setitem(KINDS, "faulty", FAULTY_KIND)
    return "faulty"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real `redis-server` of its own for the test, on a unix socket; killed and removed at the end."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


# -- the Node openai SDK (tests/node) ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_bin() -> str:
    """The Node that tests/node installs, or skip where there is no Node at all; never skip silently where
    Node exists but `make install` has not installed the client packages."""
    bundled = NODE_DIR / "node_modules" / ".bin" / "node"
    if bundled.exists():
        return str(bundled)
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH: the Node openai SDK tests need node and npm")
    pytest.fail("tests/node/node_modules is missing: run make install (it runs npm ci --prefix tests/node)")


@pytest.fixture
def node(node_bin):
    """`await node("chat.mjs", baseURL=..., model=...)`: run a client script with that spec, return its JSON."""
    env = node_env()

    async def run(script: str, **spec: Any) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            node_bin,
            str(NODE_DIR / script),
            json.dumps(spec),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            async with asyncio.timeout(NODE_TIMEOUT):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"node {script} did not finish within {NODE_TIMEOUT:g}s") from None
        assert process.returncode == 0, err.decode()
        return json.loads(out.decode().splitlines()[-1])

    return run
