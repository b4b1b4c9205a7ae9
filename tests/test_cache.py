"""Units of manaproxy/cache.py: the key (canonical body, generation, client, directives), entries and the memory
LRU. End to end, over both backends: test_response_cache.py."""

from __future__ import annotations

import time

import pytest

from manaproxy.cache import (
    KEY_PREFIX,
    Entry,
    MemoryStore,
    cache_key,
    canonical_body,
    directives,
    generation,
)
from manaproxy.config import parse_config
from manaproxy.routing import resolve

CONFIG = """
providers:
  a: {base_url: "http://127.0.0.1:1/v1", api_key: secret-key-a}
  b: {base_url: "http://127.0.0.1:2/v1"}
aliases:
  mana/x: {chain: [a/m1, b/m2], cache: true}
  mana/y: {chain: [a/m1], cache: {ttl_seconds: 5}}
"""


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        (b'{"a": 1, "b": [1, 2]}', b'{"b":[1,2],"a":1}', True),  # key order and whitespace
        (b'{"a": {"y": 1, "x": 2}}', b'{"a":{"x":2,"y":1}}', True),  # nested objects too
        (b'{"t": 0.5}', b'{"t": 0.50}', False),  # number spelling counts
        (b'{"t": 1}', b'{"t": 1.0}', False),
        (b'{"t": 1e2}', b'{"t": 100.0}', False),
        (b'{"s": "a"}', b'{"s": "\\u0061"}', True),  # a string is its value
        (b'{"stream": true}', b'{"stream": false}', False),
        (b'{"seed": 123456789012345678901234567890}', b'{"seed":123456789012345678901234567890}', True),
    ],
)
def test_canonical_body_ignores_order_and_space_only(one, other, same):
    first, second = canonical_body(one), canonical_body(other)
    assert first is not None
    assert second is not None
    assert (first == second) is same


@pytest.mark.parametrize(
    ("raw", "cached"),
    [
        (b'{"n": 1}', True),
        (b'{"n": 2}', False),
        (b'{"n": 1.0}', False),  # not the integer 1: not worth guessing
        (b'{"n": true}', False),
        (b'{"n": null}', False),
        (b"[1, 2]", False),
        (b'{"a": "\xff"}', False),  # not UTF-8: the upstream refuses it anyway
        (b"{", False),
    ],
)
def test_canonical_body_refuses_several_choices_and_what_does_not_decode(raw, cached):
    assert (canonical_body(raw) is not None) is cached


def test_the_key_is_a_hash_of_every_part():
    parts = {"path": "/chat/completions", "model": "mana/x", "body": b'{"a":1}', "client": None, "generation": b"g"}
    key = cache_key(**parts)
    assert key.startswith(KEY_PREFIX)
    assert len(key) == len(KEY_PREFIX) + 64
    assert "mana" not in key.removeprefix(KEY_PREFIX)  # no request text in a Redis key name
    assert cache_key(**parts) == key
    for name, other in [
        ("path", "/completions"),
        ("model", "mana/y"),
        ("body", b'{"a":2}'),
        ("client", b"someone"),
        ("generation", b"h"),
    ]:
        assert cache_key(**{**parts, name: other}) != key, name
    # Parts are length-prefixed: moving bytes from one to the next makes another key.
    assert cache_key(**{**parts, "path": "/chat/completionsm", "model": "ana/x"}) != key


def test_the_generation_follows_the_chain_and_the_providers_not_their_keys():
    config = parse_config(CONFIG, env={}, source="t")
    x = generation(config, resolve("mana/x", config))
    assert x != generation(config, resolve("mana/y", config))
    assert generation(config, resolve("mana/x", config)) == x

    rekeyed = parse_config(CONFIG.replace("secret-key-a", "another-key"), env={}, source="t")
    assert generation(rekeyed, resolve("mana/x", rekeyed)) == x
    described = parse_config(CONFIG.replace("cache: true", "cache: true, description: hi"), env={}, source="t")
    assert generation(described, resolve("mana/x", described)) == x
    reordered = parse_config(CONFIG.replace("[a/m1, b/m2]", "[b/m2, a/m1]"), env={}, source="t")
    assert generation(reordered, resolve("mana/x", reordered)) != x
    moved = parse_config(CONFIG.replace("127.0.0.1:2", "127.0.0.1:3"), env={}, source="t")
    assert generation(moved, resolve("mana/x", moved)) != x
    assert generation(moved, resolve("mana/y", moved)) == generation(config, resolve("mana/y", config))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (True, True)),
        ("", (True, True)),
        ("max-age=60", (True, True)),
        ("no-cache", (False, True)),
        ("No-Cache", (False, True)),
        ("max-age=0, no-cache", (False, True)),
        ("no-store", (False, False)),
        ("no-cache, no-store", (False, False)),
        ('no-cache="x"', (False, True)),
    ],
)
def test_cache_control_directives(header, expected):
    assert directives(header) == expected


def test_an_entry_survives_its_round_trip_and_junk_is_no_entry():
    entry = Entry(1700000000.5, True, "text/event-stream", "a/m%C3%A8", b"data: 1\n\ndata: [DONE]\n\n")
    assert Entry.loads(entry.dumps()) == entry
    for junk in (b"", b"no newline", b"[1]\nbody", b'["x", true, "t", "r"]\nbody', b"\xff\n"):
        assert Entry.loads(junk) is None


def test_the_memory_store_keeps_the_most_recently_used_within_its_bytes():
    def entry(size: int) -> Entry:
        return Entry(time.time(), False, "application/json", "a/m1", b"x" * size)

    store = MemoryStore(max_bytes=3 * entry(1000).size)
    for key in ("k1", "k2", "k3"):
        store.put(key, entry(1000), ttl=60)
    assert store.get("k1") is not None  # k1 is now the most recently used
    store.put("k4", entry(1000), ttl=60)
    assert store.get("k2") is None  # the least recently used went
    assert [store.get(key) is not None for key in ("k1", "k3", "k4")] == [True, True, True]
    assert store.size == 3 * entry(1000).size

    store.put("huge", entry(10_000), ttl=60)  # larger than the whole store: not kept, nothing evicted
    assert store.get("huge") is None
    assert len(store) == 3

    store.put("k1", entry(10), ttl=60)  # replaced: its bytes are counted once
    assert store.size == 2 * entry(1000).size + entry(10).size

    store.max_bytes = entry(10).size  # a reload lowered the bound
    store.shrink()
    assert len(store) == 1
    assert store.get("k1") is not None


def test_memory_entries_expire():
    store = MemoryStore(max_bytes=10_000)
    store.put("k", Entry(time.time(), False, "application/json", "a/m1", b"{}"), ttl=0.01)
    time.sleep(0.02)
    assert store.get("k") is None
    assert store.size == 0
