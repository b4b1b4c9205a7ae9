"""Requests aiohttp's HTTP parser refuses: an OpenAI-shaped error with a truthful status, one short
WARNING, and never a header value (a client key least of all) in a log line or a traceback."""

from __future__ import annotations

import logging

import orjson
import pytest

from .helpers import build_config, raw_exchange, split_response

CLIENT_KEY = "client-key-0123456789abcdef"

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
BODY = b'{"model": "mana/x"}'
CASES = {
    "control byte in a header": (
        HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\x01\r\nContent-Length: 19\r\n\r\n" + BODY,
        400,
        "malformed_request",
    ),
    "URL too long": (b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "header too large": (
        HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode() + b"a" * 9000 + b"\r\n\r\n",
        431,
        "header_too_large",
    ),
    "too many headers": (HEAD + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431, "too_many_headers"),
    "Content-Encoding aiohttp cannot decode": (
        HEAD + b"Content-Encoding: br\r\nContent-Length: 19\r\n\r\n" + BODY,
        415,
        "unsupported_content_encoding",
    ),
    "Content-Encoding nobody knows": (
        HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
        b"Content-Encoding: snappy-v9\r\nContent-Length: 19\r\n\r\n" + BODY,
        415,
        "unsupported_content_encoding",
    ),
    "invalid chunk size": (
        HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY + b"\r\n0\r\n\r\n",
        400,
        None,
    ),
}


@pytest.fixture
async def proxy(make_upstream, make_proxy):
    up = await make_upstream("a")
    return await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}), api_keys=[CLIENT_KEY.encode()])


@pytest.mark.parametrize("case", list(CASES))
async def test_a_malformed_request_gets_an_openai_error_and_one_short_warning(proxy, case, caplog):
    request, status, code = CASES[case]
    caplog.set_level(logging.DEBUG)

    raw = await raw_exchange(proxy.client.server.port, request)

    got_status, headers, body = split_response(raw)
    assert got_status == status
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    assert CLIENT_KEY not in body.decode("latin-1")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]
    assert all(CLIENT_KEY not in r.getMessage() for r in caplog.records)


async def test_the_real_server_logs_a_malformed_request_without_its_key(make_upstream, serve):
    up = await make_upstream("a")
    process = await serve(build_config({"a": up}, {"mana/x": ["a/m1"]}), MANAPROXY_API_KEYS=CLIENT_KEY)
    request, _, _ = CASES["control byte in a header"]

    raw = await raw_exchange(process.port, request)

    assert split_response(raw)[0] == 400
    line = await process.wait_line(lambda text: "malformed request" in text)
    assert "WARNING" in line
    assert "malformed_request" in line
    assert CLIENT_KEY not in process.stderr
    assert "Traceback" not in process.stderr
    assert not process.lines_with("ERROR")


@pytest.mark.parametrize("case", list(CASES))
async def test_a_malformed_requests_answer_names_no_server_software(proxy, case):
    request, _status, _code = CASES[case]

    raw = await raw_exchange(proxy.client.server.port, request)

    assert "server" not in split_response(raw)[1]  # no `Server: Python/3.11 aiohttp/...`
