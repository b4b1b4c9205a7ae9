"""The request log of real requests, end to end: one line per request saying what it did, a failure at WARNING,
no secret in any log record, and nothing a client sends (a path, a model name) can forge a line, a field or an
attempt — in this process and in the real `manaproxy serve`, over raw requests. (`reqlog.format_record` itself:
test_reqlog.py.)"""

from __future__ import annotations

import json
import logging
from urllib.parse import unquote

import orjson
import pytest

from .fakes import chat_answer, chat_chunks, sse_reply, status_reply
from .helpers import build_config, logged_attempts, parse_logfmt, raw_exchange, raw_post, split_response


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


async def test_no_secret_reaches_the_log(make_upstream, make_proxy, caplog):
    """Provider and client keys, and an upstream that echoes the key back, never show in any log record."""
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(401, "Incorrect API key provided: test-key-provider-a")
    b.default = sse_reply(chat_chunks("m2", ["ok"], usage=(4, 1)))
    config = build_config(
        {
            "a": {"base_url": a, "api_key": "${A_KEY}"},
            "b": {"base_url": b, "api_key": "test-key-provider-b", "headers": {"X-Api-Key": "test-key-header-b"}},
        },
        {"mana/x": ["a/m1", "b/m2"]},
    )
    proxy = await make_proxy(config, env={"A_KEY": "test-key-provider-a"}, api_keys=[b"test-key-client"])
    caplog.set_level(logging.DEBUG)
    resp = await proxy.client.post(
        "/v1/chat/completions",
        json={"model": "mana/x", "stream": True, "messages": []},
        headers={"Authorization": "Bearer test-key-client", "X-Request-ID": "req-secret-check"},
    )
    assert resp.status == 200
    assert b"[DONE]" in await resp.read()
    assert a.requests[0].headers["Authorization"] == "Bearer test-key-provider-a"  # the key really was in play

    lines = [r.getMessage() for r in caplog.records if r.name == "manaproxy.request"]
    assert len(lines) == 1
    fields = parse_logfmt(lines[0])
    assert fields["request_id"] == "req-secret-check"
    assert fields["resolved"] == "b/m2"
    assert fields["attempts"] == "a/m1:http_401"
    assert (fields["status"], fields["stream"], fields["outcome"]) == ("200", "true", "completed")
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == ("4", "1")
    everything = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "test-key" not in everything

    health = await (await proxy.client.get("/v1/health", headers={"Authorization": "Bearer test-key-client"})).json()
    assert "HTTP 401" in health["providers"]["a"]["models"]["m1"]["last_error"]
    assert "test-key" not in str(health)


async def test_a_failed_request_logs_at_warning(make_upstream, make_proxy, caplog):
    a = await make_upstream("a")
    a.default = status_reply(503)
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    caplog.set_level(logging.INFO, logger="manaproxy.request")
    resp = await proxy.client.post("/v1/chat/completions", json={"model": "mana/x", "messages": []})
    assert resp.status == 503
    (record,) = [r for r in caplog.records if r.name == "manaproxy.request"]
    assert record.levelno == logging.WARNING
    fields = parse_logfmt(record.getMessage())
    assert (fields["status"], fields["error"], fields["attempts"]) == ("503", "all_failed", "a/m1:http_503")


async def test_a_client_model_name_cannot_forge_logged_attempts(make_upstream, make_proxy, caplog):
    a = await make_upstream("a")
    a.default = status_reply(503)
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    caplog.set_level(logging.INFO, logger="manaproxy.request")
    model = "a/status:500,a/ok:won"
    resp = await proxy.client.post("/v1/chat/completions", json={"model": model, "messages": []})
    assert resp.status == 503
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/status:500%2Ca/ok:won=HTTP 503"
    (record,) = [r for r in caplog.records if r.name == "manaproxy.request"]
    assert logged_attempts(parse_logfmt(record.getMessage())["attempts"]) == [(model, "http_503")]


@pytest.mark.parametrize(
    ("stream", "status"),
    [(False, 200), (True, 200), (False, 400)],  # an answer, a stream, the upstream's own 4xx relayed
)
async def test_resolved_header_percent_encodes_a_non_ascii_model(make_upstream, make_proxy, caplog, stream, status):
    a = await make_upstream("a")
    a.default = chat_answer("m") if status == 200 else status_reply(status, "bad request")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    caplog.set_level(logging.INFO, logger="manaproxy.request")
    model = "a/modèle 100%"
    body = json.dumps({"model": model, "stream": stream, "messages": []}).encode()

    raw = await raw_exchange(proxy.port, raw_post("/v1/chat/completions", body))

    head = raw.partition(b"\r\n\r\n")[0]
    assert head.isascii()
    assert split_response(raw)[0] == status
    assert b"\r\nX-Mana-LLM-Resolved: a/mod%C3%A8le 100%25\r\n" in head
    assert unquote(split_response(raw)[1]["x-mana-llm-resolved"]) == model
    (record,) = [r for r in caplog.records if r.name == "manaproxy.request"]
    assert parse_logfmt(record.getMessage())["resolved"] == model  # the log line is text: logfmt quotes it
