"""`health/news.py`: what a breaker news message holds, and what a receiver refuses to read."""

from __future__ import annotations

import orjson
import pytest

from manaproxy.config import ProviderConfig
from manaproxy.health.news import DOWN, RATE_LIMITED, UP, Message, News, decode, encode, upstream_digest

ORIGIN = "0123456789abcdef"
SECRET = "sk-very-secret-key-0000"


def test_a_message_round_trips() -> None:
    for news in (
        News(DOWN, "a", seconds=60.0),
        News(UP, "a", "llama3.1:8b", "chat+image"),
        News(RATE_LIMITED, "g", "m"),
    ):
        message = Message(news, ORIGIN, "f" * 16)
        assert decode(encode(message)) == message


def test_the_upstream_digest_holds_no_key_and_no_url_and_tells_upstreams_apart() -> None:
    spec = ProviderConfig(name="a", kind="openai", base_url="http://10.0.0.1:8000/v1", api_key=SECRET)
    rekeyed = ProviderConfig(name="a", kind="openai", base_url="http://10.0.0.1:8000/v1", api_key="other")
    moved = ProviderConfig(name="a", kind="openai", base_url="http://10.0.0.2:8000/v1", api_key=SECRET)
    digest = upstream_digest(spec)
    assert digest == upstream_digest(rekeyed)  # the same server, whatever key each instance holds
    assert digest != upstream_digest(moved)
    data = encode(Message(News(DOWN, "a", "m1"), ORIGIN, digest))
    assert SECRET.encode() not in data
    assert b"10.0.0.1" not in data


GOOD = {"v": 1, "from": ORIGIN, "upstream": "f" * 16, "event": "down", "provider": "a", "model": None, "kind": "chat"}


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},  # another version of the format
        {"event": "sideways"},
        {"provider": ""},
        {"provider": "a b"},
        {"provider": 7},
        {"model": ""},
        {"model": "m" * 300},
        {"kind": "Chat"},
        {"kind": "chat+a+b+c+d"},
        {"from": "not-hex"},
        {"upstream": None},
        {"seconds": -1},
        {"seconds": True},
        {"seconds": "5"},
    ],
)
def test_anything_out_of_bounds_is_ignored(change: dict[str, object]) -> None:
    assert decode(orjson.dumps({**GOOD, "seconds": 1.0} | change)) is None


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b"null", orjson.dumps({**GOOD, "pad": "x" * 4096})])
def test_what_is_not_a_message_of_ours_is_ignored(data: bytes) -> None:
    assert decode(data) is None
