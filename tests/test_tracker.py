"""`health.HealthTracker` driven by a fake clock: breaker, half-open, rate limits, saturation, listeners."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace

import orjson
import pytest

from manaproxy.config import AutoConcurrency, HealthSettings, ProviderConfig, Target
from manaproxy.health import HealthTracker
from manaproxy.health.news import DOWN, RATE_LIMITED, UP, News
from manaproxy.providers.base import UpstreamFailure
from manaproxy.views.health import snapshot

SETTINGS = HealthSettings(failure_threshold=3, backoff_seconds=60.0)
WALL_START = 1_700_000_000.0


class FakeClock:
    """A monotonic clock the test moves by hand; `wall` is the matching unix time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_START + (self.now - 1000.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def provider(name: str = "a", *, api_key: str | None = None, max_concurrent: int = 0) -> ProviderConfig:
    return ProviderConfig(
        name=name, kind="openai", base_url="http://127.0.0.1:9/v1", api_key=api_key, max_concurrent=max_concurrent
    )


def providers(*names: str) -> dict[str, ProviderConfig]:
    return {name: provider(name) for name in names}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock: FakeClock) -> HealthTracker:
    return HealthTracker(SETTINGS, providers("a", "b"), clock=clock, wall_clock=clock.wall)


@pytest.fixture
def requests() -> Iterator[ExitStack]:
    """Requests held in flight until the test ends."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def transitions(tracker: HealthTracker) -> list[tuple[str, bool]]:
    heard: list[tuple[str, bool]] = []
    tracker.add_listener(lambda name, healthy: heard.append((name, healthy)))
    return heard


def open_breaker(tracker: HealthTracker, name: str = "a") -> None:
    for i in range(SETTINGS.failure_threshold):
        tracker.failed(name, f"HTTP 500 #{i}")


# -- breaker --------------------------------------------------------------------------------------


def test_starts_healthy(tracker: HealthTracker) -> None:
    assert tracker.skip_reason(provider()) is None
    assert tracker.status("a") == "healthy"
    assert tracker.unavailable_until("a") is None
    assert tracker.names() == ["a", "b"]


def test_breaker_opens_after_threshold_consecutive_failures(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    for i in range(SETTINGS.failure_threshold - 1):
        tracker.failed("a", "HTTP 500")
        assert tracker.skip_reason(provider()) is None, f"opened after {i + 1} failures"
        assert tracker.status("a") == "healthy"
    assert transitions == []
    tracker.failed("a", "HTTP 500")
    assert tracker.skip_reason(provider()) == "unhealthy"
    assert tracker.status("a") == "unhealthy"
    assert tracker.get("a").breaker.consecutive_failures == SETTINGS.failure_threshold
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + SETTINGS.backoff_seconds)
    assert transitions == [("a", False)]
    # the other provider is untouched
    assert tracker.skip_reason(provider("b")) is None


def test_success_resets_the_count(tracker: HealthTracker) -> None:
    for _ in range(SETTINGS.failure_threshold - 1):
        tracker.failed("a", "HTTP 500")
    tracker.succeeded("a", latency=0.25)
    assert tracker.get("a").breaker.consecutive_failures == 0
    assert tracker.get("a").last_latency == 0.25
    for _ in range(SETTINGS.failure_threshold - 1):
        tracker.failed("a", "HTTP 500")
    assert tracker.skip_reason(provider()) is None


def test_neutral_outcome_does_not_count(tracker: HealthTracker) -> None:
    for _ in range(SETTINGS.failure_threshold * 2):
        tracker.noted("a", "HTTP 404: model not served")
    assert tracker.skip_reason(provider()) is None
    assert tracker.get("a").breaker.consecutive_failures == 0
    assert tracker.get("a").breaker.last_error == "HTTP 404: model not served"


def test_unhealthy_until_backoff_then_half_open(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds - 0.001)
    assert tracker.skip_reason(provider()) == "unhealthy"
    clock.advance(0.001)
    # half-open: requests may go, but the provider is not called healthy until one succeeds
    assert tracker.skip_reason(provider()) is None
    assert tracker.status("a") == "unhealthy"
    assert tracker.get("a").breaker.healthy is False
    assert tracker.unavailable_until("a") is None
    assert transitions == [("a", False)]


def test_success_in_half_open_closes(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    tracker.succeeded("a")
    assert tracker.status("a") == "healthy"
    assert tracker.skip_reason(provider()) is None
    assert tracker.get("a").breaker.consecutive_failures == 0
    assert transitions == [("a", False), ("a", True)]
    # closed again: it takes a full threshold of failures to reopen
    tracker.failed("a", "HTTP 500")
    assert tracker.skip_reason(provider()) is None


def test_failure_in_half_open_reopens_at_once(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds + 5)
    tracker.failed("a", "connect refused")
    assert tracker.skip_reason(provider()) == "unhealthy"
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + SETTINGS.backoff_seconds)
    assert transitions == [("a", False)]  # still the same outage: no second transition
    clock.advance(SETTINGS.backoff_seconds)
    assert tracker.skip_reason(provider()) is None


def test_success_while_open_closes(tracker: HealthTracker, transitions: list[tuple[str, bool]]) -> None:
    # A request that started before the breaker opened and then succeeds proves the provider works.
    open_breaker(tracker)
    tracker.succeeded("a", latency=0.2)
    assert tracker.skip_reason(provider()) is None
    assert tracker.breaker("a") == "closed"
    assert tracker.get("a").last_latency == 0.2
    assert transitions == [("a", False), ("a", True)]


def one_strike(clock: FakeClock, backoff: float = 10) -> HealthTracker:
    """A tracker of provider `a` whose breaker opens at the first failure, for `backoff` seconds."""
    return HealthTracker(
        HealthSettings(failure_threshold=1, backoff_seconds=backoff), providers("a"), clock=clock, wall_clock=clock.wall
    )


def test_a_probe_success_closes_an_open_breaker(clock: FakeClock) -> None:
    tracker = one_strike(clock)
    tracker.failed("a", "boom")
    assert (tracker.breaker("a"), tracker.skip_reason(provider())) == ("open", "unhealthy")
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + 10)  # wall time of the window's end
    clock.advance(1)
    tracker.succeeded("a", probe=True)
    assert (tracker.breaker("a"), tracker.skip_reason(provider()), tracker.status("a")) == ("closed", None, "healthy")


def test_recovery_probes_come_at_a_growing_interval_while_the_provider_stays_down(clock: FakeClock) -> None:
    tracker = one_strike(clock)
    tracker.failed("a", "boom")
    due = []
    for _ in range(60):  # 30 s of checking every half second
        clock.advance(0.5)
        if tracker.recovery_probes()[0]:
            due.append(clock.now - 1000.0)
            tracker.failed("a", "probe: connect refused", probe=True)
    # 1 s after opening, then 2, 4, 8 s apart, then every backoff (10 s); half-open re-opens on failure.
    assert due[:5] == [1.0, 3.0, 7.0, 15.0, 25.0]


def test_a_provider_that_probes_well_but_fails_requests_is_retried_less_and_less(clock: FakeClock) -> None:
    """/models answering while completions fail: each close by a probe doubles the next first probe delay."""
    tracker = one_strike(clock, backoff=60)
    delays = []
    for _ in range(5):
        tracker.failed("a", "HTTP 500")  # a request fails: open
        opened = clock.now
        while not tracker.recovery_probes()[0]:
            clock.advance(0.25)
        delays.append(clock.now - opened)
        tracker.succeeded("a", probe=True)  # /models answers: closed again
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    tracker.succeeded("a", 0.1)  # a real request succeeds: the next outage starts at 1 s again
    tracker.failed("a", "HTTP 500")
    assert tracker.get("a").breaker.probe_at == clock.now + 1.0


def test_failures_inside_the_window_do_not_stretch_it_and_a_half_open_failure_rearms_it(clock: FakeClock) -> None:
    tracker = one_strike(clock)
    tracker.failed("a", "boom")
    clock.advance(9)
    tracker.failed("a", "probe: timed out after 3s")
    clock.advance(1)
    assert tracker.breaker("a") == "half_open"
    tracker.failed("a", "still down")
    assert tracker.breaker("a") == "open"
    clock.advance(9.9)
    assert tracker.skip_reason(provider()) == "unhealthy"
    clock.advance(0.1)
    assert tracker.skip_reason(provider()) is None
    assert tracker.get("a").breaker.last_error == "still down"


def test_threshold_one() -> None:
    clock = FakeClock()
    tracker = HealthTracker(HealthSettings(failure_threshold=1, backoff_seconds=5), providers("a"), clock=clock)
    tracker.failed("a", "HTTP 500")
    assert tracker.skip_reason(provider()) == "unhealthy"


def test_unconfigured_provider_is_skipped_first(tracker: HealthTracker) -> None:
    assert tracker.skip_reason(provider(api_key="")) == "unconfigured"
    assert tracker.skip_reason(provider(api_key="test-key-1")) is None
    open_breaker(tracker)
    assert tracker.skip_reason(provider(api_key="")) == "unconfigured"


# -- rate limits and saturation -------------------------------------------------------------------


def test_rate_limited_keeps_provider_out_without_counting_a_failure(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    tracker.rate_limited("a", 30.0, "HTTP 429: slow down")
    record = tracker.get("a")
    assert tracker.skip_reason(provider()) == "rate_limited"
    assert record.breaker.consecutive_failures == 0
    assert record.breaker.healthy is True
    assert record.breaker.last_error == "HTTP 429: slow down"
    assert tracker.status("a") == "healthy"
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + 30.0)
    assert transitions == []
    clock.advance(29.9)
    assert tracker.skip_reason(provider()) == "rate_limited"
    clock.advance(0.1)
    assert tracker.skip_reason(provider()) is None


def test_shorter_retry_after_does_not_shorten_the_window(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.rate_limited("a", 30.0, "HTTP 429")
    tracker.rate_limited("a", 1.0, "HTTP 429")
    clock.advance(10)
    assert tracker.skip_reason(provider()) == "rate_limited"


def test_saturation(tracker: HealthTracker) -> None:
    limited = provider(max_concurrent=2)
    with ExitStack() as requests:
        requests.enter_context(tracker.attempt(limited))
        assert tracker.skip_reason(limited) is None
        with tracker.attempt(limited):
            assert tracker.skip_reason(limited) == "saturated"
            assert tracker.skip_reason(provider()) is None  # max_concurrent 0 = unlimited
        assert tracker.skip_reason(limited) is None
    assert tracker.get("a").in_flight == 0


def test_a_request_that_raises_still_gives_back_its_place(tracker: HealthTracker) -> None:
    limited = provider(max_concurrent=1)
    with pytest.raises(asyncio.CancelledError), tracker.attempt(limited):
        raise asyncio.CancelledError  # the client went away
    assert (tracker.get("a").in_flight, tracker.skip_reason(limited)) == (0, None)


def test_probes_hold_no_place(tracker: HealthTracker) -> None:
    with tracker.attempt(provider(max_concurrent=1), probe=True):
        assert tracker.get("a").in_flight == 0


def test_breaker_wins_over_rate_limit_and_saturation(tracker: HealthTracker) -> None:
    with tracker.attempt(provider()):
        tracker.rate_limited("a", 300.0, "HTTP 429")
        open_breaker(tracker)
        assert tracker.skip_reason(provider(max_concurrent=1)) == "unhealthy"


# -- listeners ------------------------------------------------------------------------------------


def test_listeners_hear_each_transition_once(clock: FakeClock) -> None:
    tracker = HealthTracker(SETTINGS, providers("a", "b"), clock=clock)
    first: list[tuple[str, bool]] = []
    second: list[tuple[str, bool]] = []
    tracker.add_listener(lambda name, healthy: first.append((name, healthy)))
    tracker.add_listener(lambda name, healthy: second.append((name, healthy)))
    for _ in range(SETTINGS.failure_threshold * 3):
        tracker.failed("a", "HTTP 500")
    tracker.failed("b", "HTTP 500")
    tracker.succeeded("a")
    tracker.succeeded("a")
    tracker.succeeded("b")
    expected = [("a", False), ("a", True)]
    assert first == expected
    assert second == expected


def test_raising_listener_does_not_break_the_tracker(
    tracker: HealthTracker, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[tuple[str, bool]] = []

    def broken(name: str, healthy: bool) -> None:
        raise RuntimeError("listener exploded")

    tracker.add_listener(broken)
    tracker.add_listener(lambda name, healthy: heard.append((name, healthy)))
    with caplog.at_level(logging.ERROR, logger="manaproxy.health"):
        open_breaker(tracker)
        clock.advance(SETTINGS.backoff_seconds)
        tracker.succeeded("a")
    # the state machine moved on and later listeners still heard every transition
    assert tracker.status("a") == "healthy"
    assert heard == [("a", False), ("a", True)]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(failures) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in failures)
    assert "health listener" in failures[0].getMessage()


def test_transitions_are_logged_as_warnings(tracker: HealthTracker, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="manaproxy.health"):
        open_breaker(tracker)
        tracker.succeeded("a")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "provider a unhealthy after 3 consecutive failures" in messages[0]
    assert "provider a recovered" in messages[1]


# -- reconfigure ----------------------------------------------------------------------------------


def test_reconfigure_keeps_surviving_adds_new_drops_removed(tracker: HealthTracker, clock: FakeClock) -> None:
    open_breaker(tracker, "a")
    tracker.failed("b", "HTTP 502")
    new_settings = HealthSettings(failure_threshold=1, backoff_seconds=5.0)
    tracker.reconfigure(new_settings, providers("a", "c"))
    assert tracker.names() == ["a", "c"]
    assert tracker.settings == new_settings
    assert tracker.skip_reason(provider("a")) == "unhealthy"  # state kept
    assert tracker.get("a").breaker.consecutive_failures == SETTINGS.failure_threshold
    assert tracker.get("c").breaker.consecutive_failures == 0
    assert tracker.skip_reason(provider("c")) is None
    # new settings apply: one failure now opens c's breaker for 5 s
    tracker.failed("c", "HTTP 500")
    assert tracker.skip_reason(provider("c")) == "unhealthy"
    clock.advance(5)
    assert tracker.skip_reason(provider("c")) is None
    # b is gone; if it comes back it starts clean
    tracker.reconfigure(new_settings, providers("a", "b", "c"))
    assert tracker.get("b").breaker.consecutive_failures == 0
    assert tracker.get("b").breaker.last_error is None


def test_get_unknown_provider_gives_a_detached_clean_record(tracker: HealthTracker) -> None:
    tracker.failed("gone", "HTTP 500")  # e.g. a request still running on a config a reload replaced
    assert tracker.get("gone").breaker.healthy is True
    assert tracker.get("gone").breaker.consecutive_failures == 0
    assert "gone" not in tracker.names()


# -- snapshot and repr ----------------------------------------------------------------------------

DOCUMENTED_KEYS = {
    "status",
    "consecutive_failures",
    "last_error",
    "last_check_unix",
    "unhealthy_until_unix",
    "in_flight",
}


def test_snapshot_fresh_has_every_provider(tracker: HealthTracker) -> None:
    providers = [provider("a"), provider("b", api_key="test-key-snap"), provider("c", api_key="")]
    view = snapshot(tracker, providers)
    assert set(view) == {"a", "b", "c"}
    for entry in view.values():
        assert set(entry) >= DOCUMENTED_KEYS
    assert {key: view["a"][key] for key in DOCUMENTED_KEYS} == {
        "status": "healthy",
        "consecutive_failures": 0,
        "last_error": None,
        "last_check_unix": None,
        "unhealthy_until_unix": None,
        "in_flight": 0,
    }
    assert view["a"]["kind"] == "openai"
    assert view["a"]["configured"] is True
    assert view["c"]["status"] == "unconfigured"
    assert view["c"]["configured"] is False
    assert "test-key-snap" not in repr(view)


def test_snapshot_reflects_state(tracker: HealthTracker, clock: FakeClock, requests: ExitStack) -> None:
    requests.enter_context(tracker.attempt(provider("b")))
    tracker.succeeded("b", latency=0.123456)
    clock.advance(10)
    open_breaker(tracker, "a")
    view = snapshot(tracker, [provider("a"), provider("b", max_concurrent=4)])
    assert view["a"]["status"] == "unhealthy"
    assert view["a"]["consecutive_failures"] == 3
    assert view["a"]["last_error"] == "HTTP 500 #2"
    assert view["a"]["last_check_unix"] == pytest.approx(clock.wall())
    assert view["a"]["unhealthy_until_unix"] == pytest.approx(clock.wall() + 60)
    assert view["b"]["status"] == "healthy"
    assert view["b"]["in_flight"] == 1
    assert view["b"]["max_concurrent"] == 4
    assert view["b"]["last_latency_seconds"] == 0.1235
    assert view["b"]["last_check_unix"] == pytest.approx(clock.wall() - 10)
    # half-open still reads unhealthy, with no window left
    clock.advance(60)
    view = snapshot(tracker, [provider("a")])
    assert view["a"]["status"] == "unhealthy"
    assert view["a"]["unhealthy_until_unix"] is None


def test_snapshot_rate_limited(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.rate_limited("a", 20, "HTTP 429")
    view = snapshot(tracker, [provider("a")])["a"]
    assert view["status"] == "rate_limited"
    assert view["unhealthy_until_unix"] == pytest.approx(clock.wall() + 20)


def test_last_error_is_sanitized_and_truncated(tracker: HealthTracker) -> None:
    tracker.failed("a", "HTTP 500:\n  line one\r\n\tline two   ")
    assert tracker.get("a").breaker.last_error == "HTTP 500: line one line two"
    tracker.failed("a", "x" * 10_000)
    error = tracker.get("a").breaker.last_error
    assert error is not None
    assert len(error) == 200
    assert error.endswith("...")
    tracker.rate_limited("a", 1, "y\n" * 1000)
    assert len(tracker.get("a").breaker.last_error or "") == 200
    tracker.noted("a", "z\n" * 1000)
    assert "\n" not in (tracker.get("a").breaker.last_error or "")


def test_repr_reads_well(tracker: HealthTracker, requests: ExitStack) -> None:
    tracker.failed("a", "HTTP 500")
    requests.enter_context(tracker.attempt(provider("b")))
    assert repr(tracker.get("a")) == "<ProviderHealth a healthy failures=1 in_flight=0 last_error='HTTP 500'>"
    open_breaker(tracker)
    assert repr(tracker) == (
        "<HealthTracker [<ProviderHealth a unhealthy failures=4 in_flight=0 last_error='HTTP 500 #2'>, "
        "<ProviderHealth b healthy failures=0 in_flight=1 last_error=None>]>"
    )


def test_half_open_lets_one_trial_through(tracker: HealthTracker, clock: FakeClock) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    assert tracker.skip_reason(provider()) is None
    with tracker.attempt(provider()):  # the trial request
        assert tracker.skip_reason(provider()) == "half_open"
    assert tracker.skip_reason(provider()) is None


def test_a_request_from_before_the_breaker_opened_is_not_the_trial(
    tracker: HealthTracker, clock: FakeClock, requests: ExitStack
) -> None:
    requests.enter_context(tracker.attempt(provider()))  # a long stream, started while the provider was healthy
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    assert tracker.skip_reason(provider()) is None  # half-open: the old stream does not block the trial
    requests.enter_context(tracker.attempt(provider()))
    assert tracker.skip_reason(provider()) == "half_open"  # only one trial at a time


def test_a_stale_trial_ending_does_not_release_the_current_trial(
    tracker: HealthTracker, clock: FakeClock, requests: ExitStack
) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    stale = ExitStack()
    stale.enter_context(tracker.attempt(provider()))  # trial 1: a stream that runs on ...
    tracker.succeeded("a", probe=True)  # ... while a probe closes the breaker (trial 1 holds no claim now)
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    requests.enter_context(tracker.attempt(provider()))  # trial 2
    assert tracker.skip_reason(provider()) == "half_open"

    stale.close()  # trial 1 ends

    assert tracker.skip_reason(provider()) == "half_open"  # trial 2 is still deciding


# -- secrets --------------------------------------------------------------------------------------


def test_configured_keys_never_reach_last_error_or_snapshot(clock: FakeClock) -> None:
    specs = {
        "a": provider("a", api_key="test-key-echoed-1"),
        "b": ProviderConfig(
            name="b", kind="openai", base_url="http://127.0.0.1:9/v1", headers={"X-Api-Key": "test-hdr-secret-2"}
        ),
    }
    tracker = HealthTracker(SETTINGS, specs, clock=clock)
    tracker.failed("a", "HTTP 401: Incorrect API key provided: test-key-echoed-1")
    tracker.rate_limited("b", 5, "HTTP 429: slow down, test-hdr-secret-2")
    view = snapshot(tracker, specs.values())
    text = repr(view) + repr(tracker)
    assert "test-key-echoed-1" not in text
    assert "test-hdr-secret-2" not in text
    assert str(view["a"]["last_error"]).startswith("HTTP 401: Incorrect API key provided: ")


def test_redaction_does_not_mangle_text_around_short_keys(clock: FakeClock) -> None:
    tracker = HealthTracker(SETTINGS, {"a": provider("a", api_key="y")}, clock=clock)
    tracker.failed("a", "timed out   before the\nfirst byte (Bearer abcdefgh12345)")
    assert tracker.get("a").breaker.last_error == "timed out before the first byte ([redacted])"


def test_key_shaped_strings_are_redacted_even_if_not_configured(tracker: HealthTracker) -> None:
    fake_keys = ["sk-" + "T" * 32, "gsk_" + "t" * 40, "Bearer test.token.value"]
    for fake in fake_keys:
        tracker.failed("a", f"HTTP 401: bad credentials {fake} rejected")
        assert fake not in (tracker.get("a").breaker.last_error or "")


def test_reconfigure_with_configs_resets_a_provider_whose_upstream_changed(clock: FakeClock) -> None:
    old = {"a": provider("a"), "b": provider("b")}
    tracker = HealthTracker(SETTINGS, old, clock=clock)
    heard: list[tuple[str, bool]] = []
    tracker.add_listener(lambda name, healthy: heard.append((name, healthy)))
    open_breaker(tracker, "a")
    open_breaker(tracker, "b")
    moved = ProviderConfig(name="a", kind="openai", base_url="http://127.0.0.1:10/v1")
    tracker.reconfigure(SETTINGS, {"a": moved, "b": provider("b")})
    assert tracker.skip_reason(moved) is None  # pointed elsewhere: tried now
    assert tracker.skip_reason(provider("b")) == "unhealthy"  # same upstream: state kept
    assert heard == [("a", False), ("b", False), ("a", True)]


# -- rate limits, kinds of request, trials (issue 16) -----------------------------------------------


def _failure(status: int, message: str = "boom", headers: list[tuple[str, str]] | None = None) -> UpstreamFailure:
    return UpstreamFailure.from_status(status, dict(headers or []), orjson.dumps({"error": {"message": message}}), None)


def _fail(tracker: HealthTracker, failure: UpstreamFailure, kind: str = "chat", model: str = "m") -> None:
    with tracker.attempt(provider(), model, kind=kind) as slot:
        slot.failed(failure)


def test_a_429_without_a_hint_keeps_the_model_out_for_a_growing_default_that_a_success_resets(
    tracker: HealthTracker, clock: FakeClock
) -> None:
    waits = []
    for _ in range(7):
        _fail(tracker, _failure(429, "slow down"))
        waits.append(tracker.retry_in("a", "m"))
        clock.advance(100)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert tracker.target("a", "m").breaker.consecutive_failures == 0  # never an outage
    with tracker.attempt(provider(), "m") as slot:
        slot.succeeded()
    _fail(tracker, _failure(429, "slow down"))
    assert tracker.retry_in("a", "m") == 1.0


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ([("retry-after-ms", "1500")], 1.5),
        ([("Retry-After", "7")], 7.0),
        ([("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "6m0s")], 360.0),
    ],
)
def test_a_429_keeps_the_model_out_for_its_hint(tracker: HealthTracker, headers, wait) -> None:
    _fail(tracker, _failure(429, "slow down", headers))
    assert (tracker.skip_reason(provider(), "m"), tracker.retry_in("a", "m")) == ("rate_limited", wait)


def test_a_kinds_failures_leave_the_models_other_kinds_in_use(tracker: HealthTracker) -> None:
    for _ in range(SETTINGS.failure_threshold):
        _fail(tracker, _failure(500), kind="chat+image")
    assert tracker.skip_reason(provider(), "m", "chat+image") == "unhealthy"
    assert (tracker.skip_reason(provider(), "m"), tracker.skip_reason(provider(), "m", "embeddings")) == (None, None)
    assert tracker.breaker("a", "m", "chat+image") == "open"
    models = snapshot(tracker, [provider()])["a"]["models"]
    assert models["m"]["kinds"]["chat+image"]["breaker"] == "open"  # type: ignore[index]
    assert models["m"]["breaker"] == "closed"  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "message"),
    [(501, "Not Implemented"), (500, "image input is not supported"), (500, "Unsupported content type")],
)
def test_a_missing_endpoint_or_feature_counts_against_nothing(tracker: HealthTracker, status, message) -> None:
    for _ in range(SETTINGS.failure_threshold + 1):
        _fail(tracker, _failure(status, message))
    record = tracker.target("a", "m")
    assert (record.breaker.consecutive_failures, tracker.skip_reason(provider(), "m")) == (0, None)
    assert record.breaker.last_error == f"HTTP {status}: {message}"


def test_an_open_models_breaker_lets_a_trial_request_through_at_each_growing_interval(
    tracker: HealthTracker, clock: FakeClock
) -> None:
    for _ in range(SETTINGS.failure_threshold):
        _fail(tracker, _failure(500))
    assert (tracker.skip_reason(provider(), "m"), tracker.retry_in("a", "m")) == ("unhealthy", 1.0)
    clock.advance(1.0)
    assert tracker.skip_reason(provider(), "m") is None  # the trial's time
    with tracker.attempt(provider(), "m") as slot:
        assert tracker.skip_reason(provider(), "m") == "unhealthy"  # one trial at a time
        slot.failed(_failure(500))
    assert tracker.retry_in("a", "m") == 2.0  # the next trial waits twice as long
    clock.advance(2.0)
    with tracker.attempt(provider(), "m") as slot:
        slot.succeeded()
    assert (tracker.breaker("a", "m"), tracker.skip_reason(provider(), "m")) == ("closed", None)


def test_retry_in_of_an_open_provider_is_its_next_probe_not_the_window(
    tracker: HealthTracker, clock: FakeClock
) -> None:
    open_breaker(tracker)
    assert tracker.retry_in("a") == 1.0  # not backoff_seconds (60)
    clock.advance(0.4)
    assert tracker.retry_in("a", "m") == pytest.approx(0.6)


def test_the_last_http_failure_of_a_kind_is_kept_for_the_lone_entry_answer(tracker: HealthTracker) -> None:
    _fail(tracker, _failure(500, "model crashed"))
    with tracker.attempt(provider(), "m") as slot:
        slot.failed(UpstreamFailure.timeout("timed out before the first byte"))
    assert tracker.last_failure("a", "m") is None  # the last failure had no status
    _fail(tracker, _failure(500, "model crashed"))
    last = tracker.last_failure("a", "m")
    assert last is not None
    assert (last.status, last.error) == (500, {"message": "model crashed"})
    assert tracker.last_failure("a", "m", "embeddings") is None


def test_since_is_when_the_present_status_began(tracker: HealthTracker, clock: FakeClock) -> None:
    """`since_unix` in `/v1/health`: null while healthy from the start, then when the breaker opened, when it
    closed, when a rate-limit window began and when it ended."""

    def since(model: str | None = None) -> float | None:
        view = snapshot(tracker, [provider("a")])["a"]
        item = view if model is None else view["models"][model]  # type: ignore[index]
        return item["since_unix"]  # type: ignore[index, return-value]

    assert since() is None
    clock.advance(5)
    for _ in range(SETTINGS.failure_threshold):
        tracker.failed("a", "boom")
    assert since() == clock.wall()
    opened = clock.wall()
    clock.advance(2)
    tracker.failed("a", "boom")  # still open: no new status
    assert since() == opened
    clock.advance(3)
    tracker.succeeded("a")
    assert since() == clock.wall()

    with tracker.attempt(provider("a"), "m1") as slot:
        slot.succeeded()
    clock.advance(1)
    tracker.rate_limited("a", 10, "HTTP 429", model="m1")
    limited = clock.wall()
    assert since("m1") == limited
    clock.advance(4)
    tracker.rate_limited("a", 10, "HTTP 429", model="m1")  # the same window, stretched: the same status
    assert since("m1") == limited
    clock.advance(20)
    assert since("m1") == limited + 14  # healthy again since the window ended


# -- load: probes hold a place, learned limits (`max_concurrent: auto`) -------------------------------------------


def auto(name: str = "a", **bounds: int) -> ProviderConfig:
    return ProviderConfig(
        name=name, kind="openai", base_url="http://127.0.0.1:9/v1", auto_concurrency=AutoConcurrency(**bounds)
    )


def test_a_probe_holds_a_place_of_the_limit(tracker: HealthTracker) -> None:
    with tracker.attempt(provider(max_concurrent=1), probe=True):
        assert tracker.skip_reason(provider(max_concurrent=1)) == "saturated"
        assert tracker.skip_reason(provider(max_concurrent=2)) is None
    assert tracker.skip_reason(provider(max_concurrent=1)) is None


def test_a_target_at_its_learned_limit_is_saturated_the_provider_s_other_models_are_not(
    tracker: HealthTracker, requests: ExitStack
) -> None:
    requests.enter_context(tracker.attempt(auto(), "m1"))  # the limit starts at min_concurrent, 1
    assert tracker.skip_reason(auto(), "m1") == "saturated"
    assert tracker.skip_reason(auto(), "m2") is None
    requests.enter_context(tracker.attempt(auto(min_concurrent=2), "m2"))
    assert tracker.skip_reason(auto(min_concurrent=2), "m2") is None  # 1 of 2


def test_a_probe_holds_a_place_of_a_learned_limit(tracker: HealthTracker) -> None:
    with tracker.attempt(auto(), "m1"):
        pass
    with tracker.attempt(auto(), probe=True):
        assert tracker.skip_reason(auto(), "m1") == "saturated"


def test_answers_teach_the_learned_limit_and_it_survives_a_reload(tracker: HealthTracker, clock: FakeClock) -> None:
    for _ in range(3):
        with tracker.attempt(auto(), "m1", stream=True) as slot:
            clock.advance(0.2)
            slot.succeeded(0.2)
    capacity = tracker.target("a", "m1").capacity
    assert capacity is not None
    assert capacity.allowed == 2
    tracker.reconfigure(SETTINGS, {"a": auto(), "b": provider("b")})
    assert tracker.target("a", "m1").capacity is capacity
    tracker.reconfigure(SETTINGS, {"a": replace(auto(), base_url="http://127.0.0.1:10/v1")})
    assert tracker.target("a", "m1").capacity is None  # another upstream: learned afresh


async def test_a_freed_place_wakes_whoever_waits_for_one(tracker: HealthTracker) -> None:
    target = Target("a", "m1")
    with tracker.attempt(auto(), "m1"):
        waiting = asyncio.create_task(tracker.slot_freed([target], 5.0))
        await asyncio.sleep(0)
        assert not waiting.done()
    assert await waiting is True
    assert await tracker.slot_freed([target], 0.01) is False


# -- news from other processes (health.shared) ------------------------------------------------------

ORIGIN = "0123456789abcdef"


def told(tracker: HealthTracker) -> list[object]:
    heard: list[object] = []
    tracker.add_news_listener(heard.append)
    return heard


def test_first_hand_openings_rate_limits_and_recoveries_are_told(tracker: HealthTracker, clock: FakeClock) -> None:
    news = told(tracker)
    open_breaker(tracker)
    tracker.rate_limited("b", 7.0, "HTTP 429", model="m1")
    tracker.failed("b", "HTTP 500", model="m2", kind="embeddings")  # counted, not opened: nothing to tell
    tracker.succeeded("a", probe=True)
    assert news == [
        News(DOWN, "a", None, "chat", 60.0),
        News(RATE_LIMITED, "b", "m1", "chat", 7.0),
        News(UP, "a"),
    ]


def test_news_of_an_opening_opens_a_closed_breaker_for_a_bounded_window(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    news = told(tracker)
    assert tracker.apply_news(News(DOWN, "a", seconds=3600.0), ORIGIN)
    assert tracker.skip_reason(provider("a")) == "unhealthy"
    assert tracker.heard_only("a", "m1")
    assert transitions == [("a", False)]
    assert news == []  # news heard is never told on: no echo
    assert tracker.get("a").breaker.unhealthy_until == clock.now + SETTINGS.backoff_seconds  # bounded here
    assert tracker.recovery_probes() == ([], clock.now + 1.0)  # probed here as after an opening of its own
    assert not tracker.apply_news(News(DOWN, "zzz"), ORIGIN)  # a provider this config does not name


def test_news_of_a_recovery_closes_only_what_news_opened(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.apply_news(News(DOWN, "a", seconds=60.0), ORIGIN)
    assert tracker.apply_news(News(UP, "a"), ORIGIN)
    assert tracker.status("a") == "healthy"
    open_breaker(tracker, "b")  # seen here: the news of another process neither reopens nor closes it
    assert not tracker.apply_news(News(UP, "b"), ORIGIN)
    assert not tracker.apply_news(News(DOWN, "b", seconds=5.0), ORIGIN)
    assert tracker.status("b") == "unhealthy"
    assert not tracker.heard_only("b")


def test_failures_seen_here_make_a_breaker_that_news_opened_our_own(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.apply_news(News(DOWN, "a", seconds=60.0), ORIGIN)
    for i in range(SETTINGS.failure_threshold - 1):
        tracker.failed("a", f"probe: refused #{i}", probe=True)
        assert tracker.heard_only("a")  # fewer failures than would open it: local health alone would try it
    tracker.failed("a", "probe: refused", probe=True)
    assert not tracker.heard_only("a")
    clock.advance(61)
    tracker.failed("a", "probe: refused", probe=True)  # the window over: out again, on its own evidence
    assert not tracker.apply_news(News(UP, "a"), ORIGIN)
    assert tracker.status("a") == "unhealthy"


def test_a_local_success_ends_what_news_said(tracker: HealthTracker) -> None:
    tracker.apply_news(News(DOWN, "a", seconds=60.0), ORIGIN)
    tracker.succeeded("a")
    assert tracker.status("a") == "healthy"
    open_breaker(tracker)
    assert not tracker.heard_only("a")  # opened here this time: no stale word of the news


def test_news_about_a_model_opens_its_kind_and_rate_limits_the_model(tracker: HealthTracker, clock: FakeClock) -> None:
    assert tracker.apply_news(News(DOWN, "a", "m1", "embeddings", 30.0), ORIGIN)
    assert tracker.skip_reason(provider("a"), "m1", "embeddings") == "unhealthy"
    assert tracker.skip_reason(provider("a"), "m1") is None  # its plain chat is another breaker
    assert tracker.heard_only("a", "m1", "embeddings")
    assert tracker.apply_news(News(UP, "a", "m1", "embeddings"), ORIGIN)
    assert tracker.skip_reason(provider("a"), "m1", "embeddings") is None
    assert tracker.apply_news(News(RATE_LIMITED, "a", "m2", seconds=5.0), ORIGIN)
    assert tracker.skip_reason(provider("a"), "m2") == "rate_limited"
    assert not tracker.apply_news(News(RATE_LIMITED, "a", "m2", seconds=2.0), ORIGIN)  # within what it knows
    clock.advance(5.1)
    assert tracker.skip_reason(provider("a"), "m2") is None


def test_a_reload_that_repoints_a_provider_forgets_the_news_about_it(tracker: HealthTracker) -> None:
    tracker.apply_news(News(DOWN, "a", seconds=60.0), ORIGIN)
    moved = ProviderConfig(name="a", kind="openai", base_url="http://127.0.0.1:10/v1")
    tracker.reconfigure(SETTINGS, {"a": moved, "b": provider("b")})
    assert tracker.status("a") == "healthy"
    open_breaker(tracker)
    assert not tracker.heard_only("a")


def test_a_refused_key_and_a_429_within_a_known_window_are_not_news(tracker: HealthTracker, clock: FakeClock) -> None:
    news = told(tracker)
    tracker.failed("a", "probe: HTTP 401", probe=True, at_once=True)  # another instance holds another key
    tracker.rate_limited("b", 10.0, "HTTP 429")
    clock.advance(1)
    tracker.rate_limited("b", 9.5, "HTTP 429")  # ends 0.5 s later than known: nothing new
    tracker.rate_limited("b", 20.0, "HTTP 429")
    assert tracker.status("a") == "unhealthy"
    assert news == [News(RATE_LIMITED, "b", None, "chat", 10.0), News(RATE_LIMITED, "b", None, "chat", 20.0)]
