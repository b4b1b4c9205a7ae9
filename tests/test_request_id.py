"""`X-Request-ID`: the client's when it is safe, a generated one otherwise; on every answer, errors
included, and sent upstream."""

from __future__ import annotations

import pytest

from .helpers import CHAT


async def test_request_id_is_echoed_when_supplied(routed_proxy):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"X-Request-ID": "client-id.42:a_b"})

    assert resp.headers["X-Request-ID"] == "client-id.42:a_b"
    assert up.requests[0].headers["X-Request-ID"] == "client-id.42:a_b"


async def test_request_id_is_generated_when_missing_and_unique(routed_proxy):
    _up, proxy = routed_proxy

    ids = [(await proxy.client.post(CHAT, json={"model": "mana/x"})).headers["X-Request-ID"] for _ in range(3)]

    assert len(set(ids)) == 3
    assert all(len(i) >= 16 for i in ids)


@pytest.mark.parametrize("supplied", ["has spaces", "x" * 500, "semi;colon", "<script>"])
async def test_unsafe_request_id_is_replaced(routed_proxy, supplied):
    up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "mana/x"}, headers={"X-Request-ID": supplied})

    assert resp.headers["X-Request-ID"] != supplied
    assert resp.headers["X-Request-ID"] == up.requests[0].headers["X-Request-ID"]


async def test_request_id_is_on_errors_too(routed_proxy):
    _up, proxy = routed_proxy

    resp = await proxy.client.post(CHAT, json={"model": "mana/nope"}, headers={"X-Request-ID": "err-1"})

    assert resp.status == 404
    assert resp.headers["X-Request-ID"] == "err-1"
