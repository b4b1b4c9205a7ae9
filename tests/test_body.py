"""`body.parse_body` and `RequestBody.with_model`: one check of the client's JSON, and the client's bytes sent
on with only `model` changed."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from manaproxy.body import BodyBudget, _check_structure, _disposition_names, parse_body
from manaproxy.errors import ProxyError


def sent(raw: bytes, model: str = "m1") -> bytes:
    return parse_body(raw).with_model(model)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"model": "mana/x", "n": 1}', b'{"model": "m1", "n": 1}'),
        (b'{"n": 1,\n  "model" :\t"mana/x"\n}', b'{"n": 1,\n  "model" :\t"m1"\n}'),  # spacing kept
        (
            b'{"seed": 123456789012345678901234567890, "model": "a/b"}',
            b'{"seed": 123456789012345678901234567890, "model": "m1"}',
        ),
        (b'{"x": 1.0e+2, "model": "a/b", "y": -0.0}', b'{"x": 1.0e+2, "model": "m1", "y": -0.0}'),
        (b'{"model": null, "n": 1}', b'{"model": "m1", "n": 1}'),
        (b'{"n": 1}', b'{"model":"m1","n": 1}'),  # no model: the default alias; one goes first
        (b"  {}", b'  {"model":"m1"}'),
        (b"{ \n }", b'{"model":"m1" \n }'),
        (b'{"model": "caf\\u00e9", "t": "\\u00e9"}', b'{"model": "m1", "t": "\\u00e9"}'),
        # A nested `model` (a tool schema, metadata) is left alone.
        (b'{"tools": [{"model": "mana/x"}], "model": "mana/y"}', b'{"tools": [{"model": "mana/x"}], "model": "m1"}'),
        # An escaped quote before the word is inside a string, not a key.
        (
            b'{"t": "say \\"model\\": \\"mana/x\\"", "model": "mana/x"}',
            b'{"t": "say \\"model\\": \\"mana/x\\"", "model": "m1"}',
        ),
    ],
)
def test_only_the_top_level_model_changes_and_every_other_byte_stays(raw, expected):
    assert sent(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'{"meta": {"model": "mana/x"}, "model": "mana/x"}',  # a nested model with the very same value
        b'{"mod\\u0065l": "mana/x", "meta": {"model": "mana/x"}}',  # the top-level key written with an escape
        b'{"mod\\u0065l": "mana/x"}',
    ],
)
def test_ambiguous_bytes_are_re_encoded_with_the_top_level_model_set(raw):
    out = orjson.loads(sent(raw))
    assert out["model"] == "m1"
    assert {k: v for k, v in out.items() if k != "model"} == {
        k: v for k, v in orjson.loads(raw).items() if k != "model"
    }


def test_the_new_model_is_json_encoded():
    assert orjson.loads(sent(b'{"model": "a/b"}', 'we"ird\\na\u00efve'))["model"] == 'we"ird\\na\u00efve'


@pytest.mark.parametrize(
    ("raw", "model", "stream"),
    [
        (b'{"model": "mana/x", "stream": true}', "mana/x", True),
        (b'{"model": "mana/x", "stream": false}', "mana/x", False),
        (b'{"stream": null}', None, False),
        (b'{"model": null}', None, False),
        (b"{}", None, False),
    ],
)
def test_model_and_stream_are_read(raw, model, stream):
    body = parse_body(raw)
    assert (body.model, body.stream) == (model, stream)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "invalid_json"),
        (b'{"model": "mana/x",', "invalid_json"),
        (b'{"model": "x", "n": [1, 2}', "invalid_json"),  # malformed deep inside a skipped member
        (b"[1, 2]", "invalid_json"),
        (b'"text"', "invalid_json"),
        (b'{"model": 42}', "invalid_model"),
        (b'{"model": ["a"]}', "invalid_model"),
        (b'{"stream": "yes"}', "invalid_stream"),
        (b'{"stream": 1}', "invalid_stream"),
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "json_too_deep"),
    ],
)
def test_what_the_proxy_cannot_read_is_a_400(raw, code):
    with pytest.raises(ProxyError) as caught:
        parse_body(raw)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_text_that_is_not_utf8_is_left_to_whoever_decodes_it():
    body = parse_body(b'{"model": "a/b", "t": "\xff"}')
    assert body.with_model("m1") == b'{"model": "m1", "t": "\xff"}'  # a passthrough upstream judges it
    with pytest.raises(ProxyError) as caught:
        body.payload  # noqa: B018 - the google kind decodes it all
    assert (caught.value.status, caught.value.code) == (400, "invalid_json")


def test_payload_is_decoded_only_when_asked_for():
    body = parse_body(b'{"model": "a/b", "messages": [{"role": "user", "content": "hi"}]}')
    assert body._payload is None
    assert body.payload["messages"][0]["content"] == "hi"


def test_the_budget_refuses_past_its_limit_and_gets_every_byte_back():
    budget = BodyBudget()
    with budget.reserve() as first:
        first.grow(60, limit=100)
        with budget.reserve() as second:
            second.grow(30, limit=100)
            with pytest.raises(ProxyError) as caught:
                second.grow(30, limit=100)
        assert (caught.value.status, caught.value.code) == (503, "body_budget_exhausted")
        assert caught.value.headers == {"Retry-After": "1"}
        assert budget.held == 60
    assert budget.held == 0


def _structure(value: Any, depth: int = 1) -> tuple[int, int]:
    """(nesting depth, items as `_check_structure` counts them) of a decoded JSON value."""
    if isinstance(value, list):
        inner = [_structure(item, depth + 1) for item in value]
        return max([depth, *(d for d, _ in inner)]), 1 + max(len(value) - 1, 0) + sum(n for _, n in inner)
    if isinstance(value, dict):
        inner = [_structure(item, depth + 1) for item in value.values()]
        return max([depth, *(d for d, _ in inner)]), 1 + max(len(value) - 1, 0) + sum(n for _, n in inner)
    return depth - 1, 0


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 6 else 3)
    if kind == 0:
        return rng.choice(["", "[[{", "]}],", '\\"', "\\\\", '"]', "\\", 'a\\\\"b', "é", "x" * rng.randrange(30)])
    if kind == 1:
        return rng.randrange(-5, 5)
    if kind == 2:
        return rng.choice([None, True, 1.5])
    if kind in (3, 4):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(["[", "}", '"', "\\", "k", ","]) + str(i): _random_json(rng, depth + 1)
        for i in range(rng.randrange(4))
    }


@pytest.mark.parametrize("slice_size", [1, 2, 3, 7, 64, 256 * 1024])
def test_the_structure_count_matches_the_decoded_structure_whatever_the_slices(slice_size):
    rng = random.Random(slice_size)
    for _ in range(300):
        value = {"model": "m", "x": _random_json(rng)}
        raw = orjson.dumps(value)
        depth, items = _structure(value)
        _check_structure(raw, depth, items, slice_size)  # exactly at both limits: accepted
        with pytest.raises(ProxyError) as deep:
            _check_structure(raw, depth - 1, items, slice_size)
        assert (deep.value.status, deep.value.code) == (400, "json_too_deep")
        if items:
            with pytest.raises(ProxyError) as many:
                _check_structure(raw, depth, items - 1, slice_size)
            assert (many.value.status, many.value.code) == (413, "json_too_many_items")


@pytest.mark.parametrize(
    ("disposition", "names"),
    [
        ('form-data; name="model"', [("name", "model")]),
        ('form-data; filename="a;name=model;b"; name="file"', [("name", "file")]),
        ('form-data; name="a\\"b"', [("name", 'a"b')]),
        ("form-data; name=model;", [("name", "model")]),
        ("form-data; NAME*=UTF-8''mod%65l", [("name*", "model")]),
        ("form-data; name=\"x\"; name*=utf-8''model", [("name", "x"), ("name*", "model")]),
        ("form-data", []),
    ],
)
def test_content_disposition_names_are_read_as_rfc_7578_and_8187_say(disposition, names):
    assert _disposition_names(disposition) == names


@pytest.mark.parametrize(
    "disposition", ['form-data; name="model', "form-data; name=a b", "form-data; name*=bogus''x%ff"]
)
def test_a_content_disposition_no_parser_would_read_alike_is_a_400(disposition):
    with pytest.raises(ProxyError) as caught:
        _disposition_names(disposition)
    assert (caught.value.status, caught.value.code) == (400, "invalid_body")
