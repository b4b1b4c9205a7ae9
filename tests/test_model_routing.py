"""What a request's `model` resolves to, end to end: an alias, the default alias, `provider/model`, a bare
name served by ollama — or a 404/400 that names the problem, with nothing sent upstream.
(`routing.resolve` itself is table-tested in test_routing.py.)"""

from __future__ import annotations

import pytest

from .helpers import CHAT, assert_openai_error, build_config


async def test_unknown_alias_is_404_model_not_found(routed_proxy):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "mana/nope", "messages": []})

    error = await assert_openai_error(resp, 404, "model_not_found", param="model")
    assert "mana/nope" in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("model", ["nope/m1", "mana-x/m1"])
async def test_unknown_provider_is_400(routed_proxy, model):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": model, "messages": []})

    error = await assert_openai_error(resp, 400, "unknown_provider", param="model")
    assert model.split("/")[0] in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("model", ["a/", "/m1", "/"])
async def test_malformed_provider_model_is_400(routed_proxy, model):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": model, "messages": []})

    await assert_openai_error(resp, 400, param="model")
    assert up.calls == 0


@pytest.mark.parametrize("body", [{"messages": []}, {"model": None, "messages": []}, {"model": "", "messages": []}])
async def test_missing_model_uses_the_default_alias(routed_proxy, body):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json=body)

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"
    assert up.requests[0].json["model"] == "m1"


async def test_missing_model_without_default_is_400(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json={"messages": []})

    await assert_openai_error(resp, 400, "model_required", param="model")
    assert up.calls == 0


async def test_bare_model_goes_to_ollama(routed_proxy):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "gemma3:4b", "messages": []})

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "ollama/gemma3:4b"
    assert (await resp.json())["model"] == "ollama/gemma3:4b"
    assert up.requests[0].json["model"] == "gemma3:4b"


async def test_bare_model_without_an_ollama_provider_is_400(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json={"model": "gemma3:4b", "messages": []})

    await assert_openai_error(resp, 400, "unknown_provider")


async def test_provider_model_keeps_slashes_in_the_model_part(routed_proxy):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "openrouter/anthropic/claude-3-haiku", "messages": []})

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "openrouter/anthropic/claude-3-haiku"
    assert up.requests[0].json["model"] == "anthropic/claude-3-haiku"
