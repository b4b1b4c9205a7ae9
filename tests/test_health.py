"""`health.HealthTracker` driven by a fake clock: breaker, half-open, rate limits, saturation, listeners."""

from __future__ import annotations

import logging

import pytest

from manaproxy.config import HealthSettings, ProviderConfig
from manaproxy.health import HealthTracker

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
def transitions(tracker: HealthTracker) -> list[tuple[str, bool]]:
    heard: list[tuple[str, bool]] = []
    tracker.add_listener(lambda name, healthy: heard.append((name, healthy)))
    return heard


def open_breaker(tracker: HealthTracker, name: str = "a") -> None:
    for i in range(SETTINGS.failure_threshold):
        tracker.record_failure(name, f"HTTP 500 #{i}")


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
        tracker.record_failure("a", "HTTP 500")
        assert tracker.skip_reason(provider()) is None, f"opened after {i + 1} failures"
        assert tracker.status("a") == "healthy"
    assert transitions == []
    tracker.record_failure("a", "HTTP 500")
    assert tracker.skip_reason(provider()) == "unhealthy"
    assert tracker.status("a") == "unhealthy"
    assert tracker.get("a").consecutive_failures == SETTINGS.failure_threshold
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + SETTINGS.backoff_seconds)
    assert transitions == [("a", False)]
    # the other provider is untouched
    assert tracker.skip_reason(provider("b")) is None


def test_success_resets_the_count(tracker: HealthTracker) -> None:
    for _ in range(SETTINGS.failure_threshold - 1):
        tracker.record_failure("a", "HTTP 500")
    tracker.record_success("a", latency=0.25)
    assert tracker.get("a").consecutive_failures == 0
    assert tracker.get("a").last_latency == 0.25
    for _ in range(SETTINGS.failure_threshold - 1):
        tracker.record_failure("a", "HTTP 500")
    assert tracker.skip_reason(provider()) is None


def test_neutral_outcome_does_not_count(tracker: HealthTracker) -> None:
    for _ in range(SETTINGS.failure_threshold * 2):
        tracker.record_neutral("a", "HTTP 404: model not served")
    assert tracker.skip_reason(provider()) is None
    assert tracker.get("a").consecutive_failures == 0
    assert tracker.get("a").last_error == "HTTP 404: model not served"


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
    assert tracker.get("a").healthy is False
    assert tracker.unavailable_until("a") is None
    assert transitions == [("a", False)]


def test_success_in_half_open_closes(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    tracker.record_success("a")
    assert tracker.status("a") == "healthy"
    assert tracker.skip_reason(provider()) is None
    assert tracker.get("a").consecutive_failures == 0
    assert transitions == [("a", False), ("a", True)]
    # closed again: it takes a full threshold of failures to reopen
    tracker.record_failure("a", "HTTP 500")
    assert tracker.skip_reason(provider()) is None


def test_failure_in_half_open_reopens_at_once(
    tracker: HealthTracker, clock: FakeClock, transitions: list[tuple[str, bool]]
) -> None:
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds + 5)
    tracker.record_failure("a", "connect refused")
    assert tracker.skip_reason(provider()) == "unhealthy"
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + SETTINGS.backoff_seconds)
    assert transitions == [("a", False)]  # still the same outage: no second transition
    clock.advance(SETTINGS.backoff_seconds)
    assert tracker.skip_reason(provider()) is None


def test_success_while_open_closes(tracker: HealthTracker, transitions: list[tuple[str, bool]]) -> None:
    # A request that started before the breaker opened and then succeeds proves the provider works.
    open_breaker(tracker)
    tracker.record_success("a")
    assert tracker.skip_reason(provider()) is None
    assert transitions == [("a", False), ("a", True)]


def test_threshold_one() -> None:
    clock = FakeClock()
    tracker = HealthTracker(HealthSettings(failure_threshold=1, backoff_seconds=5), providers("a"), clock=clock)
    tracker.record_failure("a", "HTTP 500")
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
    tracker.record_rate_limited("a", 30.0, "HTTP 429: slow down")
    record = tracker.get("a")
    assert tracker.skip_reason(provider()) == "rate_limited"
    assert record.consecutive_failures == 0
    assert record.healthy is True
    assert record.last_error == "HTTP 429: slow down"
    assert tracker.status("a") == "healthy"
    assert tracker.unavailable_until("a") == pytest.approx(clock.wall() + 30.0)
    assert transitions == []
    clock.advance(29.9)
    assert tracker.skip_reason(provider()) == "rate_limited"
    clock.advance(0.1)
    assert tracker.skip_reason(provider()) is None


def test_shorter_retry_after_does_not_shorten_the_window(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.record_rate_limited("a", 30.0, "HTTP 429")
    tracker.record_rate_limited("a", 1.0, "HTTP 429")
    clock.advance(10)
    assert tracker.skip_reason(provider()) == "rate_limited"


def test_saturation(tracker: HealthTracker) -> None:
    limited = provider(max_concurrent=2)
    tracker.acquire("a")
    assert tracker.skip_reason(limited) is None
    tracker.acquire("a")
    assert tracker.skip_reason(limited) == "saturated"
    assert tracker.skip_reason(provider()) is None  # max_concurrent 0 = unlimited
    tracker.release("a")
    assert tracker.skip_reason(limited) is None
    tracker.release("a")
    tracker.release("a")  # an extra release never goes negative
    assert tracker.get("a").in_flight == 0


def test_breaker_wins_over_rate_limit_and_saturation(tracker: HealthTracker) -> None:
    tracker.acquire("a")
    tracker.record_rate_limited("a", 300.0, "HTTP 429")
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
        tracker.record_failure("a", "HTTP 500")
    tracker.record_failure("b", "HTTP 500")
    tracker.record_success("a")
    tracker.record_success("a")
    tracker.record_success("b")
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
        tracker.record_success("a")
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
        tracker.record_success("a")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2
    assert "provider a unhealthy after 3 consecutive failures" in messages[0]
    assert "provider a recovered" in messages[1]


# -- reconfigure ----------------------------------------------------------------------------------


def test_reconfigure_keeps_surviving_adds_new_drops_removed(tracker: HealthTracker, clock: FakeClock) -> None:
    open_breaker(tracker, "a")
    tracker.record_failure("b", "HTTP 502")
    new_settings = HealthSettings(failure_threshold=1, backoff_seconds=5.0)
    tracker.reconfigure(new_settings, providers("a", "c"))
    assert tracker.names() == ["a", "c"]
    assert tracker.settings == new_settings
    assert tracker.skip_reason(provider("a")) == "unhealthy"  # state kept
    assert tracker.get("a").consecutive_failures == SETTINGS.failure_threshold
    assert tracker.get("c").consecutive_failures == 0
    assert tracker.skip_reason(provider("c")) is None
    # new settings apply: one failure now opens c's breaker for 5 s
    tracker.record_failure("c", "HTTP 500")
    assert tracker.skip_reason(provider("c")) == "unhealthy"
    clock.advance(5)
    assert tracker.skip_reason(provider("c")) is None
    # b is gone; if it comes back it starts clean
    tracker.reconfigure(new_settings, providers("a", "b", "c"))
    assert tracker.get("b").consecutive_failures == 0
    assert tracker.get("b").last_error is None


def test_get_unknown_provider_gives_a_detached_clean_record(tracker: HealthTracker) -> None:
    tracker.record_failure("gone", "HTTP 500")  # e.g. a request still running on a config a reload replaced
    assert tracker.get("gone").healthy is True
    assert tracker.get("gone").consecutive_failures == 0
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
    view = tracker.snapshot(providers)
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


def test_snapshot_reflects_state(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.acquire("b")
    tracker.record_success("b", latency=0.123456)
    clock.advance(10)
    open_breaker(tracker, "a")
    view = tracker.snapshot([provider("a"), provider("b", max_concurrent=4)])
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
    view = tracker.snapshot([provider("a")])
    assert view["a"]["status"] == "unhealthy"
    assert view["a"]["unhealthy_until_unix"] is None


def test_snapshot_rate_limited(tracker: HealthTracker, clock: FakeClock) -> None:
    tracker.record_rate_limited("a", 20, "HTTP 429")
    view = tracker.snapshot([provider("a")])["a"]
    assert view["status"] == "rate_limited"
    assert view["unhealthy_until_unix"] == pytest.approx(clock.wall() + 20)


def test_last_error_is_sanitized_and_truncated(tracker: HealthTracker) -> None:
    tracker.record_failure("a", "HTTP 500:\n  line one\r\n\tline two   ")
    assert tracker.get("a").last_error == "HTTP 500: line one line two"
    tracker.record_failure("a", "x" * 10_000)
    error = tracker.get("a").last_error
    assert error is not None
    assert len(error) == 200
    assert error.endswith("...")
    tracker.record_rate_limited("a", 1, "y\n" * 1000)
    assert len(tracker.get("a").last_error or "") == 200
    tracker.record_neutral("a", "z\n" * 1000)
    assert "\n" not in (tracker.get("a").last_error or "")


def test_repr_reads_well(tracker: HealthTracker) -> None:
    tracker.record_failure("a", "HTTP 500")
    tracker.acquire("b")
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
    trial = tracker.acquire("a")  # the trial request
    assert trial
    assert tracker.skip_reason(provider()) == "half_open"
    tracker.release("a", trial=trial)
    assert tracker.skip_reason(provider()) is None


def test_a_request_from_before_the_breaker_opened_is_not_the_trial(tracker: HealthTracker, clock: FakeClock) -> None:
    assert not tracker.acquire("a")  # a long stream, started while the provider was healthy
    open_breaker(tracker)
    clock.advance(SETTINGS.backoff_seconds)
    assert tracker.skip_reason(provider()) is None  # half-open: the old stream does not block the trial
    assert tracker.acquire("a")
    assert not tracker.acquire("a")  # only one trial at a time


# -- secrets --------------------------------------------------------------------------------------


def test_configured_keys_never_reach_last_error_or_snapshot(clock: FakeClock) -> None:
    specs = {
        "a": provider("a", api_key="test-key-echoed-1"),
        "b": ProviderConfig(
            name="b", kind="openai", base_url="http://127.0.0.1:9/v1", headers={"X-Api-Key": "test-hdr-secret-2"}
        ),
    }
    tracker = HealthTracker(SETTINGS, specs, clock=clock)
    tracker.record_failure("a", "HTTP 401: Incorrect API key provided: test-key-echoed-1")
    tracker.record_rate_limited("b", 5, "HTTP 429: slow down, test-hdr-secret-2")
    view = tracker.snapshot(specs.values())
    text = repr(view) + repr(tracker)
    assert "test-key-echoed-1" not in text
    assert "test-hdr-secret-2" not in text
    assert str(view["a"]["last_error"]).startswith("HTTP 401: Incorrect API key provided: ")


def test_key_shaped_strings_are_redacted_even_if_not_configured(tracker: HealthTracker) -> None:
    fake_keys = ["sk-" + "T" * 32, "gsk_" + "t" * 40, "Bearer test.token.value"]
    for fake in fake_keys:
        tracker.record_failure("a", f"HTTP 401: bad credentials {fake} rejected")
        assert fake not in (tracker.get("a").last_error or "")


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
