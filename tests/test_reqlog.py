"""The request log line (`reqlog.format_record`): every field, logfmt quoting, and no secrets."""

from __future__ import annotations

import json
import logging
from urllib.parse import unquote

import pytest

from manaproxy.config import Target
from manaproxy.failures import UpstreamFailure
from manaproxy.record import Attempt, RequestRecord
from manaproxy.reqlog import format_record

from .fakes import chat_answer, chat_chunks, sse_reply, status_reply
from .helpers import FIELDS, build_config, parse_logfmt, raw_exchange, raw_post, split_response


def make_record(**changes: object) -> RequestRecord:
    record = RequestRecord(
        request_id="req-1",
        endpoint="/v1/chat/completions",
        requested="mana/x",
        alias="mana/x",
        target=Target("b", "m2"),
        streaming=True,
        status=200,
        attempts=[
            Attempt.failed(Target("a", "m1"), UpstreamFailure.from_status(503, {}, b"", None)),
            Attempt.skipped(Target("c", "m3"), "unhealthy", None),
        ],
        outcome="completed",
        prompt_tokens=3,
        completion_tokens=7,
        first_byte=0.1234,
        duration=1.5,
    )
    for key, value in changes.items():
        setattr(record, key, value)
    return record


def test_line_has_every_field_in_order():
    line = format_record(make_record())
    assert line == (
        "request_id=req-1 endpoint=/v1/chat/completions model=mana/x resolved=b/m2 "
        "attempts=a/m1:http_503,c/m3:unhealthy status=200 stream=true outcome=completed ttfb_ms=123.4 "
        "duration_ms=1500.0 prompt_tokens=3 completion_tokens=7 error=-"
    )
    assert list(parse_logfmt(line)) == FIELDS


def test_unknown_values_are_a_dash():
    line = format_record(
        RequestRecord(request_id="req-2", endpoint="/v1/embeddings", status=503, error_type="all_failed")
    )
    fields = parse_logfmt(line)
    assert list(fields) == FIELDS
    assert fields["model"] == "-"
    assert fields["resolved"] == "-"
    assert fields["attempts"] == "-"
    assert fields["stream"] == "false"
    assert fields["ttfb_ms"] == "-"
    assert fields["prompt_tokens"] == "-"
    assert fields["error"] == "all_failed"


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ("gemma3:4b", "gemma3:4b"),
        ("my model", '"my model"'),
        ("a=b", '"a=b"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("caf\u00e9", "caf\u00e9"),
        ("line\nbreak", r'"line\nbreak"'),
        ("tab\there", r'"tab\there"'),
        ("nul\x00byte", r'"nul\u0000byte"'),
        ("bell\x07", r'"bell\u0007"'),
    ],
)
def test_values_are_quoted_and_escaped_only_when_needed(model, shown):
    line = format_record(make_record(requested=model))
    assert f" model={shown} " in line
    assert parse_logfmt(line)["model"] == model


def test_a_client_string_cannot_forge_a_second_line_or_field():
    forged = 'x" status=200 outcome=completed\nrequest_id=forged model="y'
    line = format_record(make_record(requested=forged, status=503, outcome="upstream_error"))
    assert "\n" not in line
    fields = parse_logfmt(line)
    assert fields["model"] == forged
    assert fields["request_id"] == "req-1"
    assert fields["status"] == "503"
    assert fields["outcome"] == "upstream_error"


def test_an_overlong_model_is_cut():
    fields = parse_logfmt(format_record(make_record(requested="m" * 5000)))
    assert fields["model"] == "m" * 200


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


def logged_attempts(text: str) -> list[tuple[str, str]]:
    """The log's `attempts=` read as deploy/README.md documents it: items split on `,`, each split on its
    last `:`, each part percent-decoded."""
    return [tuple(unquote(part) for part in item.rsplit(":", 1)) for item in text.split(",")]  # type: ignore[misc]


@pytest.mark.parametrize(
    ("target", "reason", "logged"),
    [
        ("a/m1", "http_503", "a/m1:http_503"),
        ("gpu1/qwen2.5:7b", "hedged_lost", "gpu1/qwen2.5:7b:hedged_lost"),  # the reason is after the last `:`
        ("up/status:500,up/ok:won", "http_500", "up/status:500%2Cup/ok:won:http_500"),
        ("a/x=1%2C", "timeout", "a/x%3D1%252C:timeout"),
        ("a/b", "odd:reason,x", "a/b:odd%3Areason%2Cx"),
    ],
)
def test_attempts_escape_their_separators(target, reason, logged):
    fields = parse_logfmt(
        format_record(make_record(attempts=[Attempt(Target.parse(target), reason), Attempt(Target("c", "m3"), "x")]))
    )
    assert fields["attempts"] == f"{logged},c/m3:x"
    assert logged_attempts(fields["attempts"]) == [(target, reason), ("c/m3", "x")]


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
