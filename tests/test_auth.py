"""Client keys (`MANAPROXY_API_KEYS`): `Authorization: Bearer` or `X-API-Key` on every route but `/health` and
`/metrics`; a missing or wrong key is a 401 that quotes no key, logged once without it."""

from __future__ import annotations

import logging

import pytest

from .helpers import CHAT, assert_openai_error, build_config


@pytest.fixture
async def authed(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}), api_keys=[b"k1", b"k2"])
    return up, proxy


async def test_auth_accepts_bearer_and_x_api_key(authed):
    up, proxy = authed

    bearer = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"Authorization": "Bearer k1"})
    api_key = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"X-API-Key": "k2"})
    lower = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"Authorization": "bearer k2"})

    assert (bearer.status, api_key.status, lower.status) == (200, 200, 200)
    assert up.calls == 3


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param({}, "missing_api_key", id="missing"),
        pytest.param({"Authorization": "Bearer "}, "missing_api_key", id="empty-bearer"),
        pytest.param({"Authorization": "Bearer wrong-key-xyz"}, "invalid_api_key", id="wrong-bearer"),
        pytest.param({"X-API-Key": "wrong-key-xyz"}, "invalid_api_key", id="wrong-x-api-key"),
        pytest.param({"Authorization": "Basic k1"}, "missing_api_key", id="basic-scheme"),
        pytest.param({"Authorization": "Bearer k1k2"}, "invalid_api_key", id="concatenated"),
        pytest.param({"Authorization": "Bearer k"}, "invalid_api_key", id="prefix"),
    ],
)
async def test_auth_rejects_missing_and_wrong_keys(authed, headers, code):
    up, proxy = authed

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers=headers)

    error = await assert_openai_error(resp, 401, code)
    assert error["type"] == "authentication_error"
    assert "wrong-key-xyz" not in error["message"]
    assert up.calls == 0


async def test_a_rejected_key_is_logged_once_without_the_key(authed, caplog):
    _up, proxy = authed
    caplog.set_level(logging.INFO, logger="manaproxy.auth")

    resp = await proxy.client.post(
        CHAT, json={"model": "mana/x"}, headers={"Authorization": "Bearer wrong-key-xyz", "X-Request-ID": "rid-401"}
    )

    assert resp.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "manaproxy.auth"]
    assert len(lines) == 1
    assert "rid-401" in lines[0]
    assert "invalid_api_key" in lines[0]
    assert "wrong-key-xyz" not in caplog.text


@pytest.mark.parametrize("path", ["/v1/models", "/v1/aliases", "/v1/health", "/v1/models/mana/x"])
async def test_auth_guards_read_only_views(authed, path):
    _up, proxy = authed

    resp = await proxy.client.get(path)

    await assert_openai_error(resp, 401)
    assert (await proxy.client.get(path, headers={"Authorization": "Bearer k1"})).status == 200


@pytest.mark.parametrize("path", ["/health", "/metrics"])
async def test_health_and_metrics_are_open(authed, path):
    _up, proxy = authed

    assert (await proxy.client.get(path)).status == 200


async def test_keys_never_appear_in_any_response(authed):
    _up, proxy = authed
    seen: list[bytes] = []
    statuses: list[int] = []
    requests = [
        ("GET", "/health", {}, 200),
        ("GET", "/v1/health", {"Authorization": "Bearer k1"}, 200),
        ("GET", "/v1/aliases", {"Authorization": "Bearer k1"}, 200),
        ("GET", "/v1/models", {"Authorization": "Bearer k1"}, 200),
        ("GET", "/metrics", {}, 200),
        ("POST", CHAT, {"Authorization": "Bearer k2"}, 200),
        ("POST", CHAT, {"Authorization": "Bearer k1-not-quite"}, 401),
        ("POST", CHAT, {}, 401),
        ("GET", "/nope", {"Authorization": "Bearer k1"}, 404),
    ]
    for method, path, headers, _ in requests:
        resp = await proxy.client.request(method, path, json={"model": "mana/x"}, headers=headers)
        statuses.append(resp.status)
        seen.append(await resp.read())
        seen.extend(value.encode() for value in resp.headers.values())

    # Each answer is the one its request earns: a refusal everywhere would leave no key to find.
    assert statuses == [status for *_, status in requests]

    everything = b"\n".join(seen)
    for secret in (b"k1", b"k2", b"k1-not-quite"):
        assert secret not in everything
