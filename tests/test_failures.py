"""`failures.py`: what each named constructor of the failure taxonomy means for the chain walk and for health.

(`classify_status`, `from_status` and Retry-After parsing are tested in test_providers_base.py.)
"""

from __future__ import annotations

import pytest

from manaproxy.failures import CREDENTIALS, PROVIDER, TARGET, MidStreamFailure, UpstreamFailure, http_reason

# (failure, reason, fallback, provider_fault, scope, status)
CASES = [
    (UpstreamFailure.provider_failed("connect", "d"), "connect", True, True, PROVIDER, None),
    (UpstreamFailure.provider_failed("sdk_error", "d"), "sdk_error", True, True, PROVIDER, None),
    (UpstreamFailure.timeout("d"), "timeout", True, True, TARGET, None),
    (UpstreamFailure.ended_early("d"), "closed", True, True, TARGET, None),
    (UpstreamFailure.bad_response("d"), "bad_response", True, True, TARGET, None),
    (UpstreamFailure.too_large("d"), "too_large", True, True, TARGET, None),
    (UpstreamFailure.error_event("d"), "error_event", True, True, TARGET, None),
    (UpstreamFailure.unsupported("d"), "unsupported", True, False, TARGET, None),
    (UpstreamFailure.internal("d"), "internal", True, False, TARGET, None),
    (UpstreamFailure.internal("d", probe=True), "internal", True, True, TARGET, None),
    (UpstreamFailure.unconfigured("d", configured=False), "unconfigured", True, False, PROVIDER, None),
    (UpstreamFailure.unconfigured("d", configured=True), "unconfigured", True, True, PROVIDER, None),
    (UpstreamFailure.credentials_refused("d", b"{}"), "api_key_invalid", True, True, PROVIDER, 400),
    (UpstreamFailure.failed_precondition("d", b"{}"), "failed_precondition", True, True, PROVIDER, 400),
    (UpstreamFailure.caller_error("d", b"{}"), "bad_request", False, False, TARGET, 400),
    (UpstreamFailure.from_status(503, {}, b"", None), "http_503", True, True, TARGET, 503),
    (UpstreamFailure.from_status(404, {}, b"", None), "http_404", True, False, TARGET, 404),
    (UpstreamFailure.from_status(401, {}, b"", None), "http_401", True, True, CREDENTIALS, 401),
    (UpstreamFailure.from_status(422, {}, b"", None), "http_422", False, False, TARGET, 422),
]


@pytest.mark.parametrize(("failure", "reason", "fallback", "fault", "scope", "status"), CASES, ids=repr)
def test_each_constructor_says_what_the_failure_means(failure, reason, fallback, fault, scope, status):
    assert (failure.reason, failure.fallback, failure.provider_fault, failure.scope, failure.status) == (
        reason,
        fallback,
        fault,
        scope,
        status,
    )
    assert failure.summary == (f"HTTP {status}" if status is not None else reason)


def test_a_caller_error_goes_back_as_an_openai_shaped_body():
    failure = UpstreamFailure.caller_error("bad 'messages'", b'{"error": {}}')
    assert (failure.body, failure.content_type, failure.shaped) == (b'{"error": {}}', "application/json", True)


def test_http_reason_is_the_word_logs_and_metrics_have_always_used():
    assert http_reason(503) == "http_503"


@pytest.mark.parametrize(
    ("failure", "reason", "fault"),
    [
        (MidStreamFailure("upstream_error", "d"), "upstream_error", True),
        (MidStreamFailure("idle_timeout", "d"), "idle_timeout", True),
        (MidStreamFailure.relay_error(), "upstream_error", False),
        (MidStreamFailure.shutting_down(), "shutting_down", False),
    ],
)
def test_mid_stream_failures_of_our_own_are_not_the_providers(failure, reason, fault):
    assert (failure.reason, failure.provider_fault) == (reason, fault)
