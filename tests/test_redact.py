"""`redact.Redactor`: every configured secret and anything key-shaped becomes `[redacted]`."""

from __future__ import annotations

import orjson
import pytest

from manaproxy.config import ProviderConfig
from manaproxy.redact import REDACTED, Redactor, too_short


def provider(name: str, api_key: str | None = None, **headers: str) -> ProviderConfig:
    return ProviderConfig(name=name, kind="openai", base_url="http://127.0.0.1:9/v1", api_key=api_key, headers=headers)


def test_keys_and_secret_header_values_are_redacted_and_other_headers_are_not():
    redactor = Redactor(
        [provider("a", "test-key-aaaa-1111", **{"X-Api-Key": "hdr-secret-22222", "X-Title": "manaproxy-title"})]
    )

    text = redactor.text("got test-key-aaaa-1111 and hdr-secret-22222 for manaproxy-title")

    assert text == f"got {REDACTED} and {REDACTED} for manaproxy-title"


def test_a_key_inside_a_longer_key_is_never_left_half_redacted():
    redactor = Redactor([provider("a", "test-key-12345678"), provider("b", "test-key-12345678-longer")])

    assert redactor.text("x test-key-12345678-longer y") == f"x {REDACTED} y"


def test_values_too_short_to_be_keys_are_left_alone():
    redactor = Redactor([provider("a", "y"), provider("b", "abc1234")])

    assert redactor.text("byte abc1234") == "byte abc1234"


def test_key_shapes_are_redacted_configured_or_not():
    for fake in ["sk-proj-" + "T" * 24, "gsk_" + "t" * 40, "AIza" + "x" * 30, "xai-" + "k" * 20]:
        assert fake not in Redactor().text(f"bad credentials {fake} rejected")
    assert Redactor().text("Authorization: bearer abc.def_ghi") == f"Authorization: {REDACTED}"


def test_bytes_stay_valid_json_and_lose_escaped_forms_too():
    key = "test/key+with/slashes-0123"
    redactor = Redactor([provider("a", key)])
    body = orjson.dumps({"error": {"message": f"key {key}"}}).replace(b"/", b"\\/")

    redacted = redactor.bytes(body)

    assert orjson.loads(redacted) == {"error": {"message": f"key {REDACTED}"}}


@pytest.mark.parametrize("key", ['test"key-with-quote-0123', "test\\key-with-backslash-0123", "test-key-tab\t-0123"])
def test_a_key_echoed_json_escaped_is_redacted(key):
    redactor = Redactor([provider("a", key)])
    body = orjson.dumps({"error": {"message": f"bad key {key}"}})
    assert key.encode() not in body  # the upstream's JSON escapes it

    redacted = redactor.bytes(body)

    assert orjson.loads(redacted) == {"error": {"message": f"bad key {REDACTED}"}}


def test_key_shapes_in_bytes_are_redacted_configured_or_not():
    fake = "sk-proj-" + "T" * 24
    body = orjson.dumps({"error": {"message": f"Incorrect API key provided: {fake}"}})

    redacted = Redactor([provider("a", "test-other-key-0000")]).bytes(body)

    assert orjson.loads(redacted) == {"error": {"message": f"Incorrect API key provided: {REDACTED}"}}


def test_old_keys_stay_known_after_learning_new_ones():
    redactor = Redactor([provider("a", "test-old-key-0000")])
    redactor.learn([provider("a", "test-new-key-1111")])

    assert redactor.text("test-old-key-0000 test-new-key-1111") == f"{REDACTED} {REDACTED}"


def test_line_is_one_short_line():
    redactor = Redactor([provider("a", "test-key-aaaa-1111")])

    line = redactor.line("HTTP 401:\n  bad\r\n\ttest-key-aaaa-1111 " + "x" * 500, limit=60)

    assert line.startswith(f"HTTP 401: bad {REDACTED} xxx")
    assert len(line) == 60
    assert line.endswith("...")


def test_repr_never_shows_a_secret():
    assert repr(Redactor([provider("a", "test-key-aaaa-1111")])) == "<Redactor 1 secrets>"


def test_the_credential_strings_we_send_are_redacted_whatever_the_keys_length():
    redactor = Redactor([provider("a", "k7short", **{"X-Auth-Token": "t5abc"})])
    cases = [
        ("Authorization: Bearer k7short", f"Authorization: Bearer {REDACTED}"),
        ("authorization: bearer  k7short", f"authorization: bearer  {REDACTED}"),
        ('{"x-api-key": "k7short"}', f'{{"x-api-key": "{REDACTED}"}}'),
        ("x-auth-token: t5abc", f"x-auth-token: {REDACTED}"),
        ('{"X-Auth-Token":"t5abc"}', f'{{"X-Auth-Token":"{REDACTED}"}}'),
        ("the word k7short alone", "the word k7short alone"),  # too short to redact standing alone
    ]
    for text, expected in cases:
        assert redactor.text(text) == expected
        assert redactor.bytes(text.encode()) == expected.encode()


def test_too_short_names_the_place_and_never_the_key():
    warnings = too_short([provider("a", "k7short", **{"X-Api-Key": "abc"}), provider("b", "long-enough-key")])

    assert [w.split(" is shorter")[0] for w in warnings] == ["providers.a.api_key", "providers.a.headers.X-Api-Key"]
    assert "k7short" not in "".join(warnings)


def test_header_values_are_redacted_pair_by_pair():
    redactor = Redactor([provider("a", "test-key-aaaa-1111")])

    pairs = redactor.pairs([("WWW-Authenticate", 'Bearer error="invalid", key="test-key-aaaa-1111"'), ("X-A", "1")])

    assert pairs == [("WWW-Authenticate", f'Bearer error="invalid", key="{REDACTED}"'), ("X-A", "1")]
