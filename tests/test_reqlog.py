"""The request log line (`reqlog.format_record`): every field, logfmt quoting, attempts that keep their
separators apart. (The log of real requests: test_log_lines.py.)"""

from __future__ import annotations

import pytest

from manaproxy.config import Target
from manaproxy.failures import UpstreamFailure
from manaproxy.record import Attempt, RequestRecord
from manaproxy.reqlog import format_record

from .helpers import FIELDS, logged_attempts, parse_logfmt


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
        "duration_ms=1500.0 prompt_tokens=3 completion_tokens=7 error=- client=anonymous cache=-"
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
