"""Every error manaproxy emits itself has the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`,
with a truthful status: unknown routes and wrong methods included."""

from __future__ import annotations

import pytest

from .helpers import assert_openai_error


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/nope", 404),
        ("GET", "/v2/chat/completions", 404),
        ("GET", "/v1/chat/completions", 405),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/health", 405),
    ],
)
async def test_unknown_route_and_wrong_method_are_openai_shaped(routed_proxy, method, path, status):
    up, proxy = routed_proxy

    resp = await proxy.client.request(method, path, json={"model": "mana/x"})

    await assert_openai_error(resp, status)
    if status == 405:
        assert resp.headers["Allow"]
    assert resp.headers["X-Request-ID"]
    assert up.calls == 0
