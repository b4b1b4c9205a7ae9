"""Every error manaproxy emits itself has the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`,
with a truthful status: unknown routes and wrong methods included, and a bug of manaproxy's own (500)."""

from __future__ import annotations

import pytest

from .helpers import CHAT, assert_openai_error, build_config, chat


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


async def test_a_bug_in_manaproxy_is_an_openai_shaped_500(make_proxy, faulty_kind, caplog):
    """The last safety net (errors.error_middleware): an exception nothing else caught, here a provider module
    that breaks its contract, still gets the OpenAI shape — and its traceback goes to the log, not the client."""
    providers = {"f": {"kind": faulty_kind, "base_url": "http://127.0.0.1:9/v1"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["f/breaks-contract"]}))

    resp = await proxy.client.post(CHAT, json=chat(), headers={"X-Request-ID": "bug-1"})

    error = await assert_openai_error(resp, 500, "internal_error")
    assert error == {
        "message": "internal error in manaproxy",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert resp.headers["X-Request-ID"] == "bug-1"
    (logged,) = [r for r in caplog.records if r.name == "manaproxy.errors"]
    assert "request bug-1: unhandled error" in logged.getMessage()
    assert isinstance(logged.exc_info[1], AttributeError)
