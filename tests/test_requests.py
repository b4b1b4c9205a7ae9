"""Bad input and the edges of a request: body checks, size limit, routing of `model`, unknown routes,
request ids, client auth and CORS — and a hostile-input sweep that must never produce a 500.

Every error manaproxy emits is `{"error": {"message", "type", "param", "code"}}` with a truthful status.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .fakes import chat_completion, json_reply
from .helpers import CHAT, assert_openai_error, build_config


@pytest.fixture
async def setup(make_upstream, make_proxy):
    """Providers a, ollama, openrouter (all the same fake); aliases mana/x (default) and mana/y."""
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("whatever"))
    providers = {"a": up, "ollama": up, "openrouter": up}
    aliases = {"mana/x": ["a/m1"], "mana/y": ["a/m2"]}
    proxy = await make_proxy(build_config(providers, aliases, default="mana/x", server={"max_body_bytes": 1000}))
    return up, proxy


# -- body checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        pytest.param(b'{"model": "mana/x",', "invalid_json", None, id="truncated-json"),
        pytest.param(b"", "invalid_json", None, id="empty"),
        pytest.param(b"model=mana/x", "invalid_json", None, id="form-encoded"),
        pytest.param(b'[{"model": "mana/x"}]', "invalid_json", None, id="array"),
        pytest.param(b'"mana/x"', "invalid_json", None, id="string"),
        pytest.param(b"null", "invalid_json", None, id="null"),
        pytest.param(b'{"model": 123}', "invalid_model", "model", id="model-number"),
        pytest.param(b'{"model": ["mana/x"]}', "invalid_model", "model", id="model-array"),
        pytest.param(b'{"model": {"name": "mana/x"}}', "invalid_model", "model", id="model-object"),
        pytest.param(b'{"model": true}', "invalid_model", "model", id="model-bool"),
        pytest.param(b'{"model": "mana/x", "stream": "yes"}', "invalid_stream", "stream", id="stream-string"),
        pytest.param(b'{"model": "mana/x", "stream": 1}', "invalid_stream", "stream", id="stream-number"),
    ],
)
async def test_bad_body_is_400(setup, body, code, param):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, data=body, headers={"Content-Type": "application/json"})

    error = await assert_openai_error(resp, 400, code, param=param)
    assert error["type"] == "invalid_request_error"
    assert up.calls == 0


async def _chunks(body: bytes, size: int = 300) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def padded(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes."""
    head = b'{"model": "mana/x", "messages": [], "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413(setup, chunked):
    up, proxy = setup
    body = padded(5000)

    data = _chunks(body) if chunked else body
    resp = await proxy.client.post(CHAT, data=data, headers={"Content-Type": "application/json"})

    error = await assert_openai_error(resp, 413, "request_too_large")
    assert "1000" in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_at_the_limit_is_accepted(setup, chunked):
    up, proxy = setup
    body = padded(1000)

    resp = await proxy.client.post(CHAT, data=_chunks(body) if chunked else body)

    assert resp.status == 200
    assert up.requests[0].json["pad"] == json.loads(body)["pad"]


# -- what `model` resolves to ---------------------------------------------------------------------


async def test_unknown_alias_is_404_model_not_found(setup):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": "mana/nope", "messages": []})

    error = await assert_openai_error(resp, 404, "model_not_found", param="model")
    assert "mana/nope" in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("model", ["nope/m1", "mana-x/m1"])
async def test_unknown_provider_is_400(setup, model):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": model, "messages": []})

    error = await assert_openai_error(resp, 400, "unknown_provider", param="model")
    assert model.split("/")[0] in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("model", ["a/", "/m1", "/"])
async def test_malformed_provider_model_is_400(setup, model):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": model, "messages": []})

    await assert_openai_error(resp, 400, param="model")
    assert up.calls == 0


@pytest.mark.parametrize("body", [{"messages": []}, {"model": None, "messages": []}, {"model": "", "messages": []}])
async def test_missing_model_uses_the_default_alias(setup, body):
    up, proxy = setup

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


async def test_bare_model_goes_to_ollama(setup):
    up, proxy = setup

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


async def test_provider_model_keeps_slashes_in_the_model_part(setup):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": "openrouter/anthropic/claude-3-haiku", "messages": []})

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == "openrouter/anthropic/claude-3-haiku"
    assert up.requests[0].json["model"] == "anthropic/claude-3-haiku"


# -- routes ---------------------------------------------------------------------------------------


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
async def test_unknown_route_and_wrong_method_are_openai_shaped(setup, method, path, status):
    up, proxy = setup

    resp = await proxy.client.request(method, path, json={"model": "mana/x"})

    await assert_openai_error(resp, status)
    if status == 405:
        assert resp.headers["Allow"]
    assert resp.headers["X-Request-ID"]
    assert up.calls == 0


# -- request ids ----------------------------------------------------------------------------------


async def test_request_id_is_echoed_when_supplied(setup):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"X-Request-ID": "client-id.42:a_b"})

    assert resp.headers["X-Request-ID"] == "client-id.42:a_b"
    assert up.requests[0].headers["X-Request-ID"] == "client-id.42:a_b"


async def test_request_id_is_generated_when_missing_and_unique(setup):
    _up, proxy = setup

    ids = [(await proxy.client.post(CHAT, json={"model": "mana/x"})).headers["X-Request-ID"] for _ in range(3)]

    assert len(set(ids)) == 3
    assert all(len(i) >= 16 for i in ids)


@pytest.mark.parametrize("supplied", ["has spaces", "x" * 500, "semi;colon", "<script>"])
async def test_unsafe_request_id_is_replaced(setup, supplied):
    up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"X-Request-ID": supplied})

    assert resp.headers["X-Request-ID"] != supplied
    assert resp.headers["X-Request-ID"] == up.requests[0].headers["X-Request-ID"]


async def test_request_id_is_on_errors_too(setup):
    _up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": "mana/nope"}, headers={"X-Request-ID": "err-1"})

    assert resp.status == 404
    assert resp.headers["X-Request-ID"] == "err-1"


# -- auth -----------------------------------------------------------------------------------------


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
    for method, path, headers in [
        ("GET", "/health", {}),
        ("GET", "/v1/health", {"Authorization": "Bearer k1"}),
        ("GET", "/v1/aliases", {"Authorization": "Bearer k1"}),
        ("GET", "/v1/models", {"Authorization": "Bearer k1"}),
        ("GET", "/metrics", {}),
        ("POST", CHAT, {"Authorization": "Bearer k2"}),
        ("POST", CHAT, {"Authorization": "Bearer k1-not-quite"}),
        ("POST", CHAT, {}),
        ("GET", "/nope", {"Authorization": "Bearer k1"}),
    ]:
        resp = await proxy.client.request(method, path, json={"model": "mana/x"}, headers=headers)
        seen.append(await resp.read())
        seen.extend(value.encode() for value in resp.headers.values())

    everything = b"\n".join(seen)
    for secret in (b"k1", b"k2", b"k1-not-quite"):
        assert secret not in everything


# -- CORS -----------------------------------------------------------------------------------------

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


async def test_no_cors_headers_when_cors_is_off(setup):
    _up, proxy = setup

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"Origin": ORIGIN})
    preflight = await proxy.client.options(CHAT, headers=preflight_headers(ORIGIN))

    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Access-Control-Allow-Origin" not in preflight.headers


# -- hostile input --------------------------------------------------------------------------------


def hostile_bodies() -> list[bytes]:
    rng = random.Random(2024)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(40)]
    bodies += [
        b"\xef\xbb\xbf{}",  # BOM
        b'{"model": "\\ud800"}',  # lone surrogate
        b'{"model": "mana/x", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nesting beyond the parser's limit
        b'{"model": "mana/x", "messages": ' + b"[" * 500 + b"]" * 500 + b"}",  # deep but parseable
        b'{"model": "mana/x", "n": 1e999}',
        b'{"model": "mana/x", "n": 123456789012345678901234567890}',
        b'{"model": "mana/x", "model": 5}',
        b'{"model": "mana/x"} trailing',
        b"\x00" * 50,
        b"{" * 300,
    ]
    return bodies


HOSTILE_MODELS: list[Any] = [
    "x" * 2_000,
    "mana/" + "x" * 200_000,
    "nope/" + "x" * 200_000,
    "ollama/" + "y" * 4_000,
    "a/" + "🙂" * 1000,
    "mana/🙂",
    "mana/",
    "מודל/עברית",
    "ollama/e\u0301\u200f\u202e",
    "a/%2e%2e%2f",
    "a/../../etc/passwd",
    "a/m1?x=1#frag",
    "ollama/ with spaces ",
    "\u2028\u2029",
    "a/" + "\ufeff",
    {"$ne": None},
    [[[[[]]]]],
    -1,
    1.5,
]


async def test_hostile_input_never_yields_500(setup):
    _up, proxy = setup
    paths = [CHAT, "/v1/completions", "/v1/embeddings", "/v1/anything/else"]
    statuses = []
    for index, body in enumerate(hostile_bodies()):
        resp = await proxy.client.post(paths[index % len(paths)], data=body)
        statuses.append(resp.status)
        assert resp.status < 500, (body[:80], resp.status, await resp.text())
        if resp.status >= 400:
            await assert_openai_error(resp, resp.status)
    assert 400 in statuses


async def test_hostile_models_never_yield_500(make_upstream, make_proxy):
    up = await make_upstream("up")
    providers = {"a": up, "ollama": up}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["a/m1"]}, default="mana/x"))
    for model in HOSTILE_MODELS:
        for stream in (False, True):
            resp = await proxy.client.post(CHAT, json={"model": model, "messages": [{"x": model}], "stream": stream})
            assert resp.status < 500, (str(model)[:80], resp.status)
            body = await resp.read()
            if resp.status >= 400:
                await assert_openai_error(resp, resp.status)
                assert len(body) < 2000  # client text is cut short in messages, never echoed whole


async def test_hostile_headers_never_yield_500(setup):
    _up, proxy = setup
    for headers in [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json; charset=latin-1"},
        {"Authorization": "Bearer " + "z" * 10_000},
        {"X-API-Key": "\u00ff\u00fe"},
        {"X-Request-ID": "é" * 64},
        {"Accept": "text/event-stream"},
        {"Accept-Encoding": "gzip, br, zstd"},
        {"Origin": "null"},
    ]:
        resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers=headers)
        assert resp.status < 500, headers


@pytest.fixture
async def unlimited(make_upstream, make_proxy):
    """Providers a and ollama with the default body limit: requests reach the router and the upstream."""
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up, "ollama": up}, {"mana/x": ["a/m1"]}))
    return up, proxy


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["ollama/x\r\nSet-Cookie: a=b", "gemma\nx", "a/m\x00", "a/m\x1b[31m"])
async def test_control_characters_in_model_get_an_answer(unlimited, model, stream):
    _up, proxy = unlimited

    resp = await proxy.client.post(CHAT, json={"model": model, "stream": stream})

    assert resp.status < 500
    assert "Set-Cookie" not in resp.headers
    if resp.status >= 400:
        await assert_openai_error(resp, resp.status)


@pytest.mark.parametrize("model", ["ollama/" + "y" * 20_000, "z" * 200_000])
async def test_overlong_model_gets_a_readable_answer(unlimited, model):
    _up, proxy = unlimited

    resp = await proxy.client.post(CHAT, json={"model": model})

    assert resp.status < 500
    await resp.read()
