"""`providers/base.py`: the fall-back table (`classify_status`), Retry-After parsing and `UpstreamFailure.from_status`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import orjson
import pytest
from multidict import CIMultiDict

from manaproxy.failures import (
    UpstreamFailure,
    Verdict,
    classify_status,
    parse_duration,
    parse_retry_after,
    rate_limit_hint,
)

FALLBACK_AND_FAULT = Verdict(fallback=True, provider_fault=True)
FALLBACK_ONLY = Verdict(fallback=True, provider_fault=False)
CALLER_ERROR = Verdict(fallback=False, provider_fault=False)


# Every boundary of the four branches (3xx and 5xx fall back as provider faults, so do 401/403/408/425/429;
# 404 falls back without blame; any other status is the caller's), and the statuses providers really send.
@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, CALLER_ERROR),
        (299, CALLER_ERROR),
        (300, FALLBACK_AND_FAULT),  # redirects are never followed: a provider that redirects is misconfigured
        (307, FALLBACK_AND_FAULT),
        (399, FALLBACK_AND_FAULT),
        (400, CALLER_ERROR),
        (401, FALLBACK_AND_FAULT),
        (402, CALLER_ERROR),
        (403, FALLBACK_AND_FAULT),
        (404, FALLBACK_ONLY),
        (405, CALLER_ERROR),
        (407, CALLER_ERROR),
        (408, FALLBACK_AND_FAULT),
        (409, CALLER_ERROR),
        (413, CALLER_ERROR),
        (422, CALLER_ERROR),
        (424, CALLER_ERROR),
        (425, FALLBACK_AND_FAULT),
        (426, CALLER_ERROR),
        (428, CALLER_ERROR),
        (429, FALLBACK_AND_FAULT),
        (430, CALLER_ERROR),
        (499, CALLER_ERROR),
        (500, FALLBACK_AND_FAULT),
        (502, FALLBACK_AND_FAULT),
        (503, FALLBACK_AND_FAULT),
        (504, FALLBACK_AND_FAULT),
        (529, FALLBACK_AND_FAULT),
        (599, FALLBACK_AND_FAULT),
    ],
)
def test_classify_status(status: int, verdict: Verdict) -> None:
    assert classify_status(status) == verdict


def http_date(offset_seconds: float) -> str:
    moment = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return format_datetime(moment, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        (" 5 ", 5.0),
        ("0.5", 0.5),
        ("120", 120.0),
        ("3600", 3600.0),
        ("86400", 3600.0),  # capped
        ("1e9", 3600.0),
        ("inf", 3600.0),
        ("0", None),
        ("-5", None),
        ("-inf", None),
        ("nan", None),
        ("", None),
        (None, None),
        ("soon", None),
        ("5 seconds", None),
        ("Wed, 32 Oct 2015 07:28:00 GMT", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),  # in the past
        ("\x00\xff", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    seconds = parse_retry_after(http_date(90))
    assert seconds is not None
    assert 85 <= seconds <= 90  # HTTP dates have whole-second resolution


def test_parse_retry_after_far_future_date_is_capped() -> None:
    assert parse_retry_after(http_date(10 * 86400)) == 3600.0


def test_parse_retry_after_never_raises_on_garbage() -> None:
    samples = ["Mon, 99 Foo 99999 99:99:99 XYZ", "Thu, 01 Jan 1970 00:00:00 +9999", "1" * 5000, "0x10", "1_0"]
    for value in samples:
        result = parse_retry_after(value)
        assert result is None or 0 < result <= 3600.0


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({key.replace("_", "-"): value for key, value in values.items()})


def test_from_status_500() -> None:
    body = orjson.dumps({"error": {"message": "The server had an error", "type": "server_error"}})
    failure = UpstreamFailure.from_status(500, headers(), body, "application/json")
    assert failure.summary == "HTTP 500"
    assert failure.reason == "http_500"
    assert failure.status == 500
    assert failure.detail == "HTTP 500: The server had an error"
    assert (failure.fallback, failure.provider_fault) == (True, True)
    assert failure.retry_after is None
    assert failure.body == body  # kept for relaying when we do not fall back
    assert failure.content_type == "application/json"
    assert str(failure) == failure.detail
    assert repr(failure) == "UpstreamFailure('http_500', 'HTTP 500: The server had an error', fallback=True)"


def test_from_status_429_reads_retry_after_case_insensitively() -> None:
    failure = UpstreamFailure.from_status(429, headers(retry_after="7"), b"{}", "application/json")
    assert failure.retry_after == 7.0
    assert failure.summary == "HTTP 429"
    assert (failure.fallback, failure.provider_fault) == (True, True)


@pytest.mark.parametrize("status", [500, 503, 408, 401])
def test_retry_after_only_for_429(status: int) -> None:
    failure = UpstreamFailure.from_status(status, headers(Retry_After="30"), b"", None)
    assert failure.retry_after is None


@pytest.mark.parametrize(
    ("status", "fallback", "fault"), [(400, False, False), (404, True, False), (422, False, False), (403, True, True)]
)
def test_from_status_carries_the_verdict(status: int, fallback: bool, fault: bool) -> None:
    failure = UpstreamFailure.from_status(status, headers(), b'{"error": {"message": "m"}}', "application/json")
    assert (failure.fallback, failure.provider_fault) == (fallback, fault)
    assert failure.detail == f"HTTP {status}: m"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"", "HTTP 502"),
        (b"<html>Bad Gateway</html>", "HTTP 502"),
        (b"\xff\xfe not utf-8", "HTTP 502"),
        (b'{"error": "plain string error"}', "HTTP 502: plain string error"),
        (b'{"message": "top-level message"}', "HTTP 502: top-level message"),
        (b'{"error": {"message": "multi\\n  line\\t\\tmessage"}}', "HTTP 502: multi line message"),
        (b'{"error": {"message": ""}}', "HTTP 502"),
        (b'{"error": {"message": 5}}', "HTTP 502"),
        (b'{"error": ["x"]}', "HTTP 502"),
        (b"[1, 2]", "HTTP 502"),
        (b"[" * 5000 + b"]" * 5000, "HTTP 502"),
    ],
)
def test_from_status_detail_excerpt(body: bytes, detail: str) -> None:
    assert UpstreamFailure.from_status(502, headers(), body, None).detail == detail


def test_from_status_detail_is_a_short_excerpt_of_a_huge_body() -> None:
    message = "overloaded " + "x" * 100_000
    body = orjson.dumps({"error": {"message": message, "details": "y" * 100_000}})
    failure = UpstreamFailure.from_status(503, headers(), body, "application/json")
    assert failure.detail.startswith("HTTP 503: overloaded xxx")
    assert failure.detail.endswith("...")
    assert len(failure.detail) <= len("HTTP 503: ") + 120
    assert "y" * 50 not in failure.detail


def test_from_status_detail_ignores_non_json_body_content() -> None:
    body = b"Traceback (most recent call last): secret internals " * 1000
    failure = UpstreamFailure.from_status(500, headers(), body, "text/plain")
    assert failure.detail == "HTTP 500"


def test_summary_without_status_is_the_reason() -> None:
    failure = UpstreamFailure.timeout("timed out before the first byte")
    assert failure.summary == "timeout"
    assert failure.status is None
    assert (failure.fallback, failure.provider_fault) == (True, True)


# -- how long a 429 says to wait (issue 16) -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("20ms", 0.02),
        ("1h2m3s", 3600.0),  # capped at an hour, as Retry-After
        ("2m3s", 123.0),
        ("7m12.5s", 432.5),
        ("2", 2.0),
        ("0s", None),
        ("", None),
        ("soon", None),
        ("m", None),
    ],
)
def test_parse_duration(value: str, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([("retry-after-ms", "250"), ("Retry-After", "3")], 0.25),  # the SDKs prefer it: so do we
        ([("Retry-After-Ms", "junk"), ("Retry-After", "3")], 3.0),
        ([("Retry-After", "3"), ("x-ratelimit-reset-requests", "20s")], 3.0),
        (
            [
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1.5s"),
                ("x-ratelimit-remaining-tokens", "900"),
                ("x-ratelimit-reset-tokens", "6m0s"),
            ],
            1.5,  # the limit that is used up says when
        ),
        ([("x-ratelimit-reset-requests", "1.5s"), ("x-ratelimit-reset-tokens", "20ms")], 1.5),  # else the longest
        ([("x-ratelimit-reset-tokens", "never")], None),
        ([("x-ratelimit-remaining-tokens", "0")], None),
        ([], None),
    ],
)
def test_rate_limit_hint(headers: list[tuple[str, str]], seconds: float | None) -> None:
    assert rate_limit_hint(headers) == seconds
