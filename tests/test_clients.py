"""clients.py: MANAPROXY_API_KEYS entries, the client table (conflicts, lookup, no key in any message) and the
allow-list globs."""

from __future__ import annotations

import pytest

from manaproxy.clients import ClientTable, model_allowed, parse_env_clients
from manaproxy.config import ClientSpec, ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        (" , ,", []),
        ("sk-one", [("key-1", "sk-one")]),
        ("chat-backend:sk-1,telegram-bot:sk-2", [("chat-backend", "sk-1"), ("telegram-bot", "sk-2")]),
        ("sk-a, bench:sk-b ,sk-c", [("key-1", "sk-a"), ("bench", "sk-b"), ("key-3", "sk-c")]),
        # What precedes the first `:` is a name only when it is a valid one: otherwise the whole entry is a key.
        ("Upper:sk-x", [("key-1", "Upper:sk-x")]),
        ("app:sk:with:colons", [("app", "sk:with:colons")]),
        ("app:", [("key-1", "app:")]),
    ],
)
def test_env_entries(value, expected):
    assert [(client.name, client.keys[0]) for client in parse_env_clients(value)] == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a:sk-1,a:sk-2", r"MANAPROXY_API_KEYS\[2\]: client 'a' is named twice"),
        ("a:sk-1,b:sk-1", r"MANAPROXY_API_KEYS\[2\]: the same key is given twice"),
        ("anonymous:sk-1", r"MANAPROXY_API_KEYS\[1\]: no client may be named 'anonymous'"),
    ],
)
def test_env_errors_name_the_entry_never_the_key(value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_env_clients(value)
    assert "sk-1" not in str(caught.value)


def test_a_name_or_a_key_in_both_places_is_an_error():
    env = parse_env_clients("chat:sk-secret-1")
    with pytest.raises(ConfigError, match=r"clients\.chat: client 'chat' is also declared at MANAPROXY_API_KEYS\[1\]"):
        ClientTable(env, {"chat": ClientSpec("chat", ("sk-other",), where="clients.chat")})
    with pytest.raises(
        ConfigError, match=r"clients\.bot: a key of client 'bot' is also MANAPROXY_API_KEYS\[1\]'s"
    ) as caught:
        ClientTable(env, {"bot": ClientSpec("bot", ("sk-secret-1",), where="clients.bot")})
    assert "sk-secret-1" not in str(caught.value)


def test_identify_finds_the_client_of_any_presented_key():
    table = ClientTable(parse_env_clients("a:sk-a"), {"b": ClientSpec("b", ("sk-b1", "sk-b2"), where="clients.b")})
    assert table.enabled
    assert table.identify([b"sk-b2"]).name == "b"
    assert table.identify([b"nope", b"sk-a"]).name == "a"  # a Bearer for someone else beside our X-API-Key
    assert table.identify([b"sk-a", b"sk-b1"]).name == "a"  # the first valid one
    assert table.identify([b"sk-", b"sk-a "]) is None
    assert table.identify([]) is None
    assert "sk-" not in repr(table)
    assert "sk-" not in repr(table.clients["b"])


def test_a_client_whose_key_expanded_to_nothing_keeps_auth_on():
    table = ClientTable((), {"bot": ClientSpec("bot", (), where="clients.bot")})
    assert table.enabled
    assert table.identify([b""]) is None
    assert not ClientTable().enabled


@pytest.mark.parametrize(
    ("models", "names", "allowed"),
    [
        ((), ["anything/at-all"], True),
        (("mana/fast-text",), ["mana/fast-text"], True),
        (("mana/fast-text",), ["mana/fast-text-2"], False),
        (("groq/*",), ["groq/llama-3.1-8b-instant"], True),
        (("groq/*",), ["openrouter/groq/x"], False),
        (("openrouter/anthropic/*",), ["openrouter/anthropic/claude-3-haiku"], True),
        (("mana/*",), ["mana/vision"], True),
        (("ollama/gemma3:*",), ["gemma3:4b", "ollama/gemma3:4b"], True),  # a bare name, as routing reads it
        (("ollama/gemma3:*",), ["qwen2.5:7b", "ollama/qwen2.5:7b"], False),
        (("MANA/*",), ["mana/x"], False),  # case matters, as in routing
    ],
)
def test_model_allowed(models, names, allowed):
    assert model_allowed(ClientSpec("c", models=models), names) is allowed
