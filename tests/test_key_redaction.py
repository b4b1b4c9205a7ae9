"""An upstream that echoes our provider key never hands it on: not to the client, a log line or /v1/health."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

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
    detail = (await (await proxy.client.get("/v1/health")).json())["providers"]["a"]
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


SHORT_KEY = "k7short"  # 7 characters: under redact.MIN_SECRET_LENGTH, as self-hosted servers are often given


@pytest.fixture
async def lone_short_keyed(make_upstream, make_proxy, caplog):
    """One chain entry, whose provider has a 7-character key: its errors are relayed, not fallen back from."""
    caplog.set_level(logging.DEBUG)
    a = await make_upstream("a")
    providers = {"a": {"base_url": a, "api_key": "${A_KEY}"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1"]}), env={"A_KEY": SHORT_KEY})
    return a, proxy


@pytest.mark.parametrize(("status", "relayed"), [(400, 400), (401, 502), (500, 500)])
async def test_a_short_key_echoed_back_is_redacted_in_the_answer_and_health(lone_short_keyed, caplog, status, relayed):
    a, proxy = lone_short_keyed
    a.queue(echo_credentials(status))

    resp = await proxy.client.post(CHAT, json=chat())
    body = await resp.text()

    assert resp.status == relayed
    assert "Bearer [redacted]" in body
    health = await (await proxy.client.get("/v1/health")).json()
    if status != 400:  # a caller error is not the provider's failure
        failed = health["providers"]["a"] if status == 401 else health["providers"]["a"]["models"]["m1"]
        assert "Bearer [redacted]" in failed["last_error"]
    assert SHORT_KEY not in await everything_visible(proxy, caplog, body)


def test_check_warns_about_a_key_too_short_to_redact_and_never_prints_it(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text(
        build_config({"a": {"base_url": "http://127.0.0.1:9/v1", "api_key": "${A_KEY}"}}, {"mana/x": ["a/m1"]})
    )
    result = subprocess.run(
        [sys.executable, "-m", "manaproxy", "check", "--config", str(path)],
        env={**os.environ, "A_KEY": SHORT_KEY},
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )

    assert result.returncode == 0
    assert "warning: providers.a.api_key is shorter than 8 characters" in result.stderr
    assert SHORT_KEY not in result.stdout + result.stderr


async def test_serve_warns_at_start_about_a_key_too_short_to_redact(serve):
    config = build_config({"a": {"base_url": "http://127.0.0.1:9/v1", "api_key": "${A_KEY}"}}, {"mana/x": ["a/m1"]})
    proc = await serve(config, A_KEY=SHORT_KEY)

    assert proc.lines_with("providers.a.api_key is shorter than 8 characters")
    assert SHORT_KEY not in proc.stderr
