"""A client can never send our provider key outside the provider's base_url.

Requests go out on raw sockets: client libraries resolve dot segments before sending, which would hide
exactly the attack under test. The fake upstream records the path as it arrived on the wire.
"""

from __future__ import annotations

import orjson
import pytest

from .helpers import build_config, chat, raw_exchange, raw_post, split_response

PROVIDER_KEY = "test-provider-key-0123456789"


@pytest.fixture
async def tenant(make_upstream, make_proxy):
    """Provider `a` with a key and a base URL below the fake's root (`/tenants/acme/v1`)."""
    up = await make_upstream("up")
    base_url = up.base_url.removesuffix("/v1") + "/tenants/acme/v1"
    providers = {"a": {"base_url": base_url, "api_key": "${A_KEY}"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1"]}), env={"A_KEY": PROVIDER_KEY})
    return up, proxy


@pytest.mark.parametrize(
    "target",
    [
        "/v1/%2e%2e/%2e%2e/admin/keys",
        "/v1/chat/completions/../../../x",
        "/v1/%2e%2e/%2e%2e/%2e%2e/tenants/other/v1/chat/completions",
        "/v1/%2E%2e/admin",
        "/v1/.%2e/admin",
        "/v1/..%2fadmin",
        "/v1/x%2F..%2F..%2Fadmin",
        "/v1/./chat/completions",
        "/v1//admin",
    ],
)
async def test_a_path_with_dot_segments_is_refused_before_any_upstream_call(tenant, target):
    up, proxy = tenant

    raw = await raw_exchange(proxy.client.server.port, raw_post(target, orjson.dumps(chat("mana/x"))))

    status, headers, body = split_response(raw)
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert orjson.loads(body)["error"]["code"] == "invalid_path"
    assert up.requests == []


async def test_an_absolute_form_request_target_reaches_the_upstream_under_base_url(tenant):
    up, proxy = tenant
    target = "http://evil.example/v1/chat/completions?api-version=1"

    raw = await raw_exchange(proxy.client.server.port, raw_post(target, orjson.dumps(chat("mana/x"))))

    assert split_response(raw)[0] == 200
    [recorded] = up.requests
    assert recorded.raw_path == "/tenants/acme/v1/chat/completions?api-version=1"
    assert recorded.headers["Host"] == f"127.0.0.1:{up.port}"
    assert recorded.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_percent_escapes_reach_the_upstream_as_sent(tenant):
    up, proxy = tenant

    raw = await raw_exchange(proxy.client.server.port, raw_post("/v1/files/a%20b/content?x=%2e", orjson.dumps(chat())))

    assert split_response(raw)[0] == 200
    assert up.requests[0].raw_path == "/tenants/acme/v1/files/a%20b/content?x=%2e"
