"""An upstream that echoes our provider key never hands it on: not to the client, a log line or /v1/health."""

from __future__ import annotations

import logging

import pytest

from .fakes import echo_credentials, json_reply, sse_reply
from .helpers import CHAT, build_config, chat

KEY = "test-provider-key-0123456789"


@pytest.fixture
async def setup(make_upstream, make_proxy, caplog):
    """Provider `a` (keyed, echoes credentials when told to) before a healthy provider `b`."""
    caplog.set_level(logging.DEBUG)
    a = await make_upstream("a")
    b = await make_upstream("b")
    providers = {"a": {"base_url": a, "api_key": "${A_KEY}"}, "b": b}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1", "b/m2"]}), env={"A_KEY": KEY})
    return a, proxy


async def everything_visible(proxy, caplog, *bodies: str) -> str:
    health = await (await proxy.client.get("/v1/health")).text()
    return "\n".join([*bodies, health, caplog.text])


@pytest.mark.parametrize("status", [400, 413, 422])
@pytest.mark.parametrize("shape", ["openai", "json", "text"])
async def test_a_caller_error_that_echoes_our_key_is_relayed_redacted(setup, caplog, status, shape):
    a, proxy = setup
    a.queue(echo_credentials(status, shape=shape))

    resp = await proxy.client.post(CHAT, json=chat())
    body = await resp.text()

    assert resp.status == status
    if shape != "text":  # a text body is not quoted in our wrapper at all
        assert "Authorization: Bearer [redacted]" in body
    assert KEY not in await everything_visible(proxy, caplog, body)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_provider_failure_that_echoes_our_key_is_shown_redacted(setup, caplog, stream):
    a, proxy = setup
    a.queue(echo_credentials(401))

    resp = await proxy.client.post(CHAT, json=chat(stream=stream))
    body = await resp.text()

    assert resp.status == 200  # fell back to b
    detail = (await (await proxy.client.get("/v1/health")).json())["providers"]["a"]["models"]["m1"]  # 401: noted there
    assert "Bearer [redacted]" in detail["last_error"]
    assert KEY not in await everything_visible(proxy, caplog, body)


async def test_an_error_event_or_error_answer_that_echoes_our_key_is_shown_redacted(setup, caplog):
    a, proxy = setup
    a.queue(
        sse_reply([{"error": {"message": f"bad key {KEY}"}}], done=False),
        json_reply({"error": {"message": f"Authorization: Bearer {KEY}"}}),
    )

    bodies = [await (await proxy.client.post(CHAT, json=chat(stream=stream))).text() for stream in (True, False)]

    assert KEY not in await everything_visible(proxy, caplog, *bodies)
    assert (
        "[redacted]"
        in (await (await proxy.client.get("/v1/health")).json())["providers"]["a"]["models"]["m1"]["last_error"]
    )
