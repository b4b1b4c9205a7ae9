"""The request body: read within `server.max_body_bytes` (413 beyond it), decoded, parsed once, and refused
with a 400 when the proxy cannot use it — before any upstream is called."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from .helpers import CHAT, assert_openai_error

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
async def test_bad_body_is_400(routed_proxy, body, code, param):
    up, proxy = routed_proxy

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
async def test_body_over_the_limit_is_413(routed_proxy, chunked):
    up, proxy = routed_proxy
    body = padded(5000)

    data = _chunks(body) if chunked else body
    resp = await proxy.client.post(CHAT, data=data, headers={"Content-Type": "application/json"})

    error = await assert_openai_error(resp, 413, "request_too_large")
    assert "1000" in error["message"]
    assert up.calls == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_at_the_limit_is_accepted(routed_proxy, chunked):
    up, proxy = routed_proxy
    body = padded(1000)

    resp = await proxy.client.post(CHAT, data=_chunks(body) if chunked else body)

    assert resp.status == 200
    assert up.requests[0].json["pad"] == json.loads(body)["pad"]
