"""`paths.upstream_path`: which client paths may follow a provider's base_url, and which are refused."""

from __future__ import annotations

import pytest

from manaproxy.errors import ProxyError
from manaproxy.paths import upstream_path


@pytest.mark.parametrize(
    ("raw_path", "raw_query", "expected"),
    [
        ("/v1/chat/completions", "", "/chat/completions"),
        ("/v1/chat/completions", "api-version=2024-10-21", "/chat/completions?api-version=2024-10-21"),
        ("/v1/responses", "include[]=a|b", "/responses?include[]=a|b"),
        ("/v1/audio/transcriptions/", "", "/audio/transcriptions/"),  # a trailing slash is kept
        ("/v1/files/file-abc%20x", "", "/files/file-abc%20x"),  # escapes stay as sent
        ("/v1/models/a.b..c", "", "/models/a.b..c"),  # dots inside a segment are fine
        ("/v1/x/%252e%252e", "", "/x/%252e%252e"),  # double-encoded: the upstream decodes it to `%2e%2e`
        ("/v1/x", "q=%2e%2e/..", "/x?q=%2e%2e/.."),  # a query is no path: dots there go nowhere
    ],
)
def test_paths_under_v1_are_kept_as_sent(raw_path, raw_query, expected):
    assert upstream_path(raw_path, raw_query) == expected


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/../admin",
        "/v1/chat/completions/../../../x",
        "/v1/./chat/completions",
        "/v1/%2e%2e/%2e%2e/admin",
        "/v1/%2E%2e/admin",
        "/v1/.%2e/admin",
        "/v1/%2e/chat",
        "/v1/..",
        "/v1/a%2fb",
        "/v1/..%2Fadmin",
        "/v1/a%5c..%5cb",
        "/v1/a\\b",
        "/v1//admin",
        "/v1/chat//completions",  # an empty segment inside the path, not only at its start
        "/v1/chat/completions//",
        "/v1/a///b",
        "/v1/a b",
        "/v1/a%zz",
        "/v2/chat/completions",
        "/v1",
        "http://evil.example/v1/x",
    ],
)
def test_paths_that_could_leave_base_url_are_refused(raw_path):
    with pytest.raises(ProxyError) as caught:
        upstream_path(raw_path)
    assert (caught.value.status, caught.value.code) == (400, "invalid_path")


@pytest.mark.parametrize("raw_query", ["a=b c", "a=%g1", "a=<b>", 'a="b"'])
def test_queries_with_characters_a_url_cannot_hold_are_refused(raw_query):
    with pytest.raises(ProxyError) as caught:
        upstream_path("/v1/x", raw_query)
    assert caught.value.code == "invalid_path"
