"""CORS for browser clients: preflights answered without a key for allowed origins only, and the answer
headers a browser needs; nothing at all when CORS is off."""

from __future__ import annotations

import pytest

from .fakes import status_reply
from .helpers import CHAT, assert_openai_error, build_config

ORIGIN = "http://app.example"


@pytest.fixture
async def cors(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}), cors_origins=[ORIGIN], api_keys=[b"k1"])
    return up, proxy


def preflight_headers(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_cors_preflight_allowed_origin_without_a_key(cors):
    up, proxy = cors

    resp = await proxy.client.options(CHAT, headers=preflight_headers(ORIGIN))

    assert resp.status in (200, 204)
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    assert up.calls == 0


async def test_cors_preflight_denied_origin(cors):
    _up, proxy = cors

    resp = await proxy.client.options(CHAT, headers=preflight_headers("http://evil.example"))

    await assert_openai_error(resp, 403)
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize(("model", "status"), [("mana/x", 200), ("mana/nope", 404)])
async def test_cors_headers_on_responses_for_allowed_origin(cors, model, status):
    _up, proxy = cors

    resp = await proxy.client.post(
        CHAT, json={"model": model}, headers={"Origin": ORIGIN, "Authorization": "Bearer k1"}
    )

    assert resp.status == status
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = resp.headers["Access-Control-Expose-Headers"]
    assert "X-Request-ID" in exposed
    assert "X-Mana-LLM-Resolved" in exposed
    assert "Origin" in resp.headers.getall("Vary", [])


async def test_cors_headers_absent_for_other_origins(cors):
    _up, proxy = cors

    resp = await proxy.client.post(
        CHAT, json={"model": "mana/x"}, headers={"Origin": "http://evil.example", "Authorization": "Bearer k1"}
    )

    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_no_cors_headers_when_cors_is_off(routed_proxy):
    _up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"Origin": ORIGIN})
    preflight = await proxy.client.options(CHAT, headers=preflight_headers(ORIGIN))

    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Access-Control-Allow-Origin" not in preflight.headers


async def test_a_browser_may_read_the_rate_limit_and_retry_headers_each_by_name(cors):
    up, proxy = cors
    limits = {
        "retry-after-ms": "200",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1.5s",
        "x-ratelimit-limit-tokens": "1000",
    }
    up.default = status_reply(429, "slow down", headers=limits)

    resp = await proxy.client.post(
        CHAT, json={"model": "mana/x"}, headers={"Origin": ORIGIN, "Authorization": "Bearer k1"}
    )

    assert resp.status == 429
    exposed = {name.strip().lower() for name in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert "*" not in exposed  # no wildcard: with credentials CORS does not take one
    on_the_answer = {name.lower() for name in resp.headers} - {"content-type", "content-length", "date"}
    browser_reads = {"retry-after", "x-mana-llm-resolved", "x-mana-llm-attempts", "x-request-id", *limits}
    assert browser_reads - exposed == set()
    assert {
        name for name in on_the_answer if name.startswith(("x-ratelimit-", "retry-after", "x-mana-llm-"))
    } <= exposed
