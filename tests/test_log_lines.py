"""Nothing a client sends can forge a log line: the real `manaproxy serve` process, raw requests."""

from __future__ import annotations

import orjson

from .helpers import build_config, raw_exchange, split_response


async def test_a_rejected_request_cannot_forge_a_log_line(make_upstream, serve):
    up = await make_upstream("a")
    process = await serve(build_config({"a": up}, {"mana/x": ["a/m1"]}), MANAPROXY_API_KEYS="client-key-123456")
    port = process.port
    targets = [b"/v1/health%0aFORGED%20one", b"/v1/health%0d%0a%3c2%3eFORGED%20two", b"/v1/x%E2%80%A8FORGED%20three"]

    for target in targets:
        raw = await raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, body = split_response(raw)
        assert status == 401
        assert orjson.loads(body)["error"]["code"] == "missing_api_key"

    await process.wait_line(lambda line: "FORGED three" in line)
    rejected = process.lines_with("rejected (missing_api_key)")
    assert len(rejected) == 3
    assert [line for line in process.lines if "FORGED" in line] == rejected
    assert '"/v1/health\\nFORGED one"' in rejected[0]
    assert '"/v1/health\\r\\n<2>FORGED two"' in rejected[1]
