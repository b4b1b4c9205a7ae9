"""limits.py: GCRA check-and-count (table-driven, the clock an argument), OpenAI's header formats, the 429, and
what a failing backend means."""

from __future__ import annotations

import pytest

from manaproxy.config import ClientSpec, LimitSettings
from manaproxy.errors import ProxyError
from manaproxy.limits import (
    REQUESTS,
    TOKENS,
    Limiter,
    MemoryBackend,
    Rule,
    Verdict,
    format_reset,
    gcra,
    headers_of,
    rules_of,
)

RPM2 = Rule("requests_per_minute", REQUESTS, 2, 60.0)
TPM20 = Rule("tokens_per_minute", TOKENS, 20, 60.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (seconds to advance, requests, tokens) -> (allowed, remaining, reset, retry_after) of the one rule
        ([(0, 1, 0)], [(True, 1, 30.0, 0.0)]),
        ([(0, 1, 0), (0, 1, 0)], [(True, 1, 30.0, 0.0), (True, 0, 60.0, 0.0)]),
        ([(0, 1, 0), (0, 1, 0), (0, 1, 0)], [(True, 1, 30.0, 0.0), (True, 0, 60.0, 0.0), (False, 0, 60.0, 30.0)]),
        # One request's worth comes back every 30 s ...
        ([(0, 1, 0), (0, 1, 0), (30, 1, 0)], [(True, 1, 30.0, 0.0), (True, 0, 60.0, 0.0), (True, 0, 60.0, 0.0)]),
        # ... and a quiet minute gives the whole burst back, never more.
        (
            [(0, 1, 0), (600, 1, 0), (0, 1, 0), (0, 1, 0)],
            [(True, 1, 30.0, 0.0), (True, 1, 30.0, 0.0), (True, 0, 60.0, 0.0), (False, 0, 60.0, 30.0)],
        ),
        ([(0, 1, 0), (0, 1, 0), (29, 1, 0)], [(True, 1, 30.0, 0.0), (True, 0, 60.0, 0.0), (False, 0, 31.0, 1.0)]),
    ],
)
def test_gcra_requests_per_minute(steps, expected):
    tats = [0.0]
    now = 1000.0
    results = []
    for advance, requests, tokens in steps:
        now += advance
        tats, verdict = gcra(tats, [RPM2], now, requests=requests, tokens=tokens)
        (window,) = verdict.windows
        results.append((verdict.allowed, window.remaining, round(window.reset, 6), round(window.retry_after, 6)))
    assert results == expected


@pytest.mark.parametrize(
    ("spent", "allowed", "remaining", "retry_after"),
    [
        (0, True, 20, 0.0),
        (13, True, 7, 0.0),
        (19, True, 1, 0.0),
        (20, False, 0, 3.0),  # spent: one token's worth (3 s) until a request may pass
        (26, False, 0, 21.0),  # overspent by the last answer: refused until there is room again
    ],
)
def test_gcra_token_windows_refuse_only_once_spent(spent, allowed, remaining, retry_after):
    now = 1000.0
    tats, _ = gcra([0.0], [TPM20], now, requests=0, tokens=spent)  # an answer's tokens, counted after it
    _, verdict = gcra(tats, [TPM20], now, requests=1, tokens=0)
    (window,) = verdict.windows
    assert (verdict.allowed, window.remaining, round(window.retry_after, 6)) == (allowed, remaining, retry_after)


def test_gcra_counts_nothing_when_any_rule_refuses():
    now = 1000.0
    tats, _ = gcra([0.0, 0.0], [RPM2, TPM20], now, requests=0, tokens=20)
    after, verdict = gcra(tats, [RPM2, TPM20], now, requests=1, tokens=0)
    assert not verdict.allowed
    assert after == tats  # the request rule did not spend a request on a refused request
    assert verdict.refusing is not None
    assert verdict.refusing.rule is TPM20


def test_tokens_counted_after_the_fact_are_never_refused():
    tats, verdict = gcra([0.0], [TPM20], 1000.0, requests=0, tokens=500)
    assert verdict.allowed
    assert tats == [1000.0 + 500 * 3.0]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (1, "1s"),
        (7.66, "7.66s"),
        (30.000000000004, "30s"),
        (59.5, "59.5s"),
        (59.9991, "1m0s"),  # rounded up: a wait is never shown shorter than it is
        (60, "1m0s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (3723, "1h2m3s"),
        (86400, "24h0m0s"),
    ],
)
def test_format_reset_as_openai_writes_it(seconds, text):
    assert format_reset(seconds) == text


def test_headers_show_the_request_trio_and_the_minute_token_trio():
    client = ClientSpec("c", requests_per_minute=2, tokens_per_minute=20, tokens_per_day=1000)
    _, verdict = gcra([0.0, 0.0, 0.0], rules_of(client), 0.0, requests=1, tokens=0)
    assert headers_of(verdict) == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "20",
        "x-ratelimit-remaining-tokens": "20",
        "x-ratelimit-reset-tokens": "0s",
    }


def test_a_day_limit_that_refuses_shows_its_own_trio():
    client = ClientSpec("c", tokens_per_minute=20, tokens_per_day=100)
    rules = rules_of(client)
    tats, _ = gcra([0.0, 0.0], rules, 0.0, requests=0, tokens=100)
    _, verdict = gcra(tats, rules, 500.0, requests=1, tokens=0)  # the minute has room again, the day not yet
    headers = headers_of(verdict)
    assert not verdict.allowed
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["Retry-After"] == "364"  # a day's token comes back every 864 s


async def test_limiter_refuses_with_openais_error_shape():
    clock = Clock()
    limiter = Limiter(MemoryBackend(clock), LimitSettings())
    client = ClientSpec("bot", requests_per_minute=1)
    assert (await limiter.admit(client)) is not None
    with pytest.raises(ProxyError) as caught:
        await limiter.admit(client)
    err = caught.value
    assert err.status == 429
    assert err.relayed == {"message": err.message, "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    assert err.headers is not None
    assert err.headers["Retry-After"] == "60"
    clock.now += 60
    assert (await limiter.admit(client)) is not None


async def test_a_client_without_limits_costs_no_backend_call():
    class Refusing:
        async def take(self, *args: object, **kwargs: object) -> Verdict:
            raise AssertionError("called")

    assert await Limiter(Refusing(), LimitSettings()).admit(ClientSpec("free")) is None


class Unreachable:
    """A backend whose store is gone (what a Redis backend meets when Redis is down)."""

    async def take(self, *args: object, **kwargs: object) -> Verdict:
        raise ConnectionError("store unreachable")


async def test_a_failing_backend_fails_open_with_a_warning_and_a_count(caplog):
    limiter = Limiter(Unreachable(), LimitSettings(on_backend_error="open"))
    client = ClientSpec("bot", requests_per_minute=1)
    assert await limiter.admit(client) is None
    assert await limiter.admit(client) is None
    assert limiter.errors == 2
    assert len([r for r in caplog.records if "limit backend failed" in r.getMessage()]) == 1  # once per while


async def test_a_failing_backend_fails_closed_when_told_to():
    limiter = Limiter(Unreachable(), LimitSettings(on_backend_error="closed"))
    with pytest.raises(ProxyError) as caught:
        await limiter.admit(ClientSpec("bot", requests_per_minute=1))
    assert (caught.value.status, caught.value.code) == (503, "limits_unavailable")


@pytest.mark.parametrize("now", [1000.0, 1_765_000_000.123456], ids=["small clock", "epoch clock"])
def test_a_burst_gets_exactly_its_limit_whatever_the_clocks_magnitude(now):
    # Redis's TIME is an epoch clock (≈0.2 µs of resolution at this magnitude): computed on absolute times, a
    # fresh window of 9 a minute showed 7 left after its first request, and refused a request it had room for.
    # Requests a microsecond apart (TIME's resolution; real ones are a round trip apart at least).
    for limit in range(1, 120):
        rules = rules_of(ClientSpec("c", requests_per_minute=limit))
        tats = [0.0]
        seen = []
        for n in range(limit + 1):
            tats, verdict = gcra(tats, rules, now + n * 1e-6, requests=1, tokens=0)
            seen.append((verdict.allowed, verdict.windows[0].remaining))
        assert seen == [(True, limit - 1 - n) for n in range(limit)] + [(False, 0)], limit
