"""The catalog of what can be asked for, end to end: `/v1/models` (aliases + provider models, cached, failures
left out, each model's `created` never 0), `/v1/models/{id}` and `/v1/aliases`.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .fakes import status_reply
from .helpers import build_config

PROVIDER_KEY = "test-key-0123456789"


@pytest.fixture
async def catalog(make_upstream, make_proxy):
    """Providers: `a` lists two models, `b` one, `off` is unconfigured; two aliases, default mana/x."""
    a = await make_upstream("a")
    b = await make_upstream("b")
    off = await make_upstream("off")
    a.models = ["m1", "vendor/m2"]
    b.models = ["m3"]
    providers = {"a": a, "b": b, "off": {"base_url": off, "api_key": "${UNSET_VAR}"}}
    aliases = {
        "mana/x": {"description": "Short answers", "chain": ["a/m1", "b/m3", "off/z"]},
        "mana/y": ["b/m3"],
    }
    # A listing bounded by 1 s: far past what the fakes take even on a loaded machine (0.3 s was not, once).
    proxy = await make_proxy(build_config(providers, aliases, default="mana/x", health={"probe_timeout_seconds": 1.0}))
    return a, b, off, proxy


async def test_models_lists_aliases_and_each_configured_providers_models(catalog):
    a, b, off, proxy = catalog

    resp = await proxy.client.get("/v1/models")

    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    by_id = {item["id"]: item for item in body["data"]}
    assert list(by_id) == ["mana/x", "mana/y", "a/m1", "a/vendor/m2", "b/m3"]
    assert all(item["object"] == "model" and isinstance(item["created"], int) for item in body["data"])
    assert by_id["mana/x"]["owned_by"] == "manaproxy"
    assert by_id["mana/x"]["description"] == "Short answers"
    assert by_id["a/vendor/m2"]["owned_by"] == "a"
    assert off.models_calls == 0  # an unconfigured provider is never asked
    assert (a.models_calls, b.models_calls) == (1, 1)


async def test_models_are_cached(catalog):
    a, b, _off, proxy = catalog

    first = await (await proxy.client.get("/v1/models")).json()
    second = await (await proxy.client.get("/v1/models")).json()

    assert first == second
    assert (a.models_calls, b.models_calls) == (1, 1)


async def test_models_cache_expires(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server={"models_cache_seconds": 0.05}))

    await proxy.client.get("/v1/models")
    a.models = ["fresh"]
    await asyncio.sleep(0.1)  # the TTL has to pass; there is nothing to poll for
    body = await (await proxy.client.get("/v1/models")).json()

    assert a.models_calls == 2
    assert "a/fresh" in {item["id"] for item in body["data"]}


@pytest.mark.parametrize("failure", ["status", "hang"])
async def test_a_provider_that_cannot_list_is_left_out_and_the_call_stays_fast(catalog, failure):
    a, b, _off, proxy = catalog
    if failure == "status":
        b.models_status = 500
    else:
        b.models_delay = 30
    loop = asyncio.get_running_loop()

    started = loop.time()
    resp = await proxy.client.get("/v1/models")

    assert resp.status == 200
    assert loop.time() - started < 5.0  # bounded by probe_timeout_seconds (1 s), not by the 30 s hang
    ids = [item["id"] for item in (await resp.json())["data"]]
    assert ids == ["mana/x", "mana/y", "a/m1", "a/vendor/m2"]

    assert a.models_calls == 1


async def test_a_failed_model_list_is_not_fetched_again_within_the_ttl(catalog):
    a, b, _off, proxy = catalog
    b.models_status = 500

    for _ in range(2):
        resp = await proxy.client.get("/v1/models")
        assert resp.status == 200

    assert (a.models_calls, b.models_calls) == (1, 1)


async def test_a_failed_model_list_is_logged_without_the_provider_key(make_upstream, make_proxy, caplog):
    a = await make_upstream("a")
    a.default = status_reply(401, f"Incorrect API key provided: {PROVIDER_KEY}")
    # Under /v2 the fake's scripted handler, not its built-in model list, answers GET /models.
    base_url = a.base_url.removesuffix("/v1") + "/v2"
    proxy = await make_proxy(build_config({"a": {"base_url": base_url, "api_key": PROVIDER_KEY}}, {"mana/x": ["a/m1"]}))
    caplog.set_level(logging.DEBUG, logger="manaproxy")

    resp = await proxy.client.get("/v1/models")

    assert resp.status == 200
    assert PROVIDER_KEY not in await resp.text()
    assert any("did not list" in record.getMessage() for record in caplog.records)
    assert not [record.getMessage() for record in caplog.records if PROVIDER_KEY in record.getMessage()]


async def test_concurrent_model_lists_share_one_upstream_fetch(catalog):
    a, b, _off, proxy = catalog
    b.models_delay = 0.1

    responses = await asyncio.gather(*(proxy.client.get("/v1/models") for _ in range(5)))

    assert all(resp.status == 200 for resp in responses)
    assert (a.models_calls, b.models_calls) == (1, 1)


# -- one model ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "owned_by"),
    [("mana/x", "manaproxy"), ("a/m1", "a"), ("a/vendor/m2", "a"), ("b/m3", "b")],
)
async def test_get_one_model(catalog, model_id, owned_by):
    _a, _b, _off, proxy = catalog

    resp = await proxy.client.get(f"/v1/models/{model_id}")

    assert resp.status == 200
    body = await resp.json()
    assert body["id"] == model_id
    assert body["object"] == "model"
    assert body["owned_by"] == owned_by


@pytest.mark.parametrize("model_id", ["mana/nope", "a/nope", "nope/m1", "off/z"])
async def test_get_unknown_model_is_404(catalog, model_id):
    _a, _b, _off, proxy = catalog

    resp = await proxy.client.get(f"/v1/models/{model_id}")

    assert resp.status == 404
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found"


async def test_get_alias_model_does_not_need_providers(catalog):
    a, b, _off, proxy = catalog
    b.models_delay = 30

    resp = await proxy.client.get("/v1/models/mana/y")

    assert resp.status == 200
    assert (a.models_calls, b.models_calls) == (0, 0)


# -- aliases ---------------------------------------------------------------------------


async def test_aliases_shape(catalog):
    _a, _b, _off, proxy = catalog

    resp = await proxy.client.get("/v1/aliases")

    assert resp.status == 200
    body = await resp.json()
    assert body["default"] == "mana/x"
    assert [alias["name"] for alias in body["aliases"]] == ["mana/x", "mana/y"]
    first = body["aliases"][0]
    assert {"name", "description", "chain"} <= set(first)
    assert first["description"] == "Short answers"
    assert first["chain"] == ["a/m1", "b/m3", "off/z"]
    assert body["aliases"][1]["description"] == ""
    assert body["aliases"][1]["chain"] == ["b/m3"]


async def test_aliases_default_is_null_without_one(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    body = await (await proxy.client.get("/v1/aliases")).json()

    assert body["default"] is None
    assert body["aliases"][0]["chain"] == ["a/m1"]


# -- each model's created: the upstream's, else the config's load time ---------------------------------------


async def test_models_carry_the_upstreams_created_or_the_config_load_time(make_proxy):
    async def models(request: web.Request) -> web.Response:
        data = [
            {"id": "dated", "object": "model", "created": 1712345678, "owned_by": "up"},
            {"id": "undated", "object": "model", "owned_by": "up"},
        ]
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    try:
        before = int(time.time())
        proxy = await make_proxy(build_config({"up": f"http://127.0.0.1:{upstream.port}/v1"}, {"mana/x": ["up/dated"]}))
        listed = {item["id"]: item["created"] for item in (await (await proxy.client.get("/v1/models")).json())["data"]}
        one = await (await proxy.client.get("/v1/models/mana/x")).json()
    finally:
        await upstream.close()

    assert listed["up/dated"] == 1712345678
    assert before <= listed["up/undated"] <= int(time.time())
    assert listed["mana/x"] == listed["up/undated"] == one["created"] == proxy.config.loaded_unix
