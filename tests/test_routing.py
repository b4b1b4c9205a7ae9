"""`routing.resolve`: a request's `model` string → an ordered chain of targets, or a short, truthful error."""

from __future__ import annotations

import pytest

from manaproxy.config import Config, Target, parse_config
from manaproxy.errors import ProxyError
from manaproxy.routing import MAX_MODEL_LENGTH, resolve

CONFIG_TEXT = """
providers:
  ollama: {base_url: "http://127.0.0.1:9/v1"}
  groq: {base_url: "http://127.0.0.1:9/v1", api_key: "${GROQ_API_KEY}"}
  openrouter: {base_url: "http://127.0.0.1:9/v1"}
aliases:
  mana/fast-text:
    chain: [ollama/qwen2.5:7b, groq/llama-3.1-8b-instant, openrouter/anthropic/claude-3-haiku]
  mana/vision:
    chain: [ollama/gemma3:4b]
default: mana/fast-text
"""

FAST_TEXT = (
    Target("ollama", "qwen2.5:7b"),
    Target("groq", "llama-3.1-8b-instant"),
    Target("openrouter", "anthropic/claude-3-haiku"),
)


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG_TEXT, env={})


@pytest.fixture(scope="module")
def config_without_default() -> Config:
    return parse_config(CONFIG_TEXT.replace("default: mana/fast-text", ""), env={})


@pytest.fixture(scope="module")
def config_without_ollama() -> Config:
    text = """
providers:
  groq: {base_url: "http://127.0.0.1:9/v1"}
aliases:
  mana/x: {chain: [groq/m]}
"""
    return parse_config(text, env={})


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("mana/fast-text", ("mana/fast-text", "mana/fast-text", FAST_TEXT)),
        ("mana/vision", ("mana/vision", "mana/vision", (Target("ollama", "gemma3:4b"),))),
        (
            "groq/llama-3.3-70b-versatile",
            ("groq/llama-3.3-70b-versatile", None, (Target("groq", "llama-3.3-70b-versatile"),)),
        ),
        (
            "openrouter/anthropic/claude-3-haiku",
            ("openrouter/anthropic/claude-3-haiku", None, (Target("openrouter", "anthropic/claude-3-haiku"),)),
        ),
        ("openrouter/a/b/c/", ("openrouter/a/b/c/", None, (Target("openrouter", "a/b/c/"),))),
        ("ollama/gemma3:4b", ("ollama/gemma3:4b", None, (Target("ollama", "gemma3:4b"),))),
        ("gemma3:4b", ("gemma3:4b", None, (Target("ollama", "gemma3:4b"),))),
        ("llama3", ("llama3", None, (Target("ollama", "llama3"),))),
        (None, ("", "mana/fast-text", FAST_TEXT)),
        ("", ("", "mana/fast-text", FAST_TEXT)),
    ],
)
def test_resolve(config: Config, model: str | None, expected: tuple[str, str | None, tuple[Target, ...]]) -> None:
    route = resolve(model, config)
    assert (route.requested, route.alias, route.chain) == expected


def test_unconfigured_provider_still_resolves(config: Config) -> None:
    # groq has no key here; skipping it is the health tracker's business, not routing's.
    assert not config.providers["groq"].configured
    assert resolve("groq/m", config).chain == (Target("groq", "m"),)


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("mana/nope", 404, "model_not_found"),
        ("mana/", 404, "model_not_found"),
        ("mana/fast-text/extra", 404, "model_not_found"),
        ("anthropic/claude-3", 400, "unknown_provider"),
        ("Ollama/llama3", 400, "unknown_provider"),  # provider names are case-sensitive
        ("ollama/", 400, "invalid_model"),
        ("/llama3", 400, "invalid_model"),
        ("/", 400, "invalid_model"),
    ],
)
def test_resolve_errors(config: Config, model: str, status: int, code: str) -> None:
    with pytest.raises(ProxyError) as info:
        resolve(model, config)
    assert (info.value.status, info.value.code, info.value.param) == (status, code, "model")
    assert model in info.value.message


@pytest.mark.parametrize("model", [None, ""])
def test_missing_model_without_default_is_400(config_without_default: Config, model: str | None) -> None:
    with pytest.raises(ProxyError) as info:
        resolve(model, config_without_default)
    assert info.value.status == 400
    assert info.value.code == "model_required"


def test_bare_name_without_ollama_is_unknown_provider(config_without_ollama: Config) -> None:
    with pytest.raises(ProxyError) as info:
        resolve("llama3", config_without_ollama)
    assert (info.value.status, info.value.code) == (400, "unknown_provider")
    assert "'ollama'" in info.value.message


def test_unknown_alias_message_points_at_aliases(config: Config) -> None:
    with pytest.raises(ProxyError) as info:
        resolve("mana/nope", config)
    assert info.value.message == "The model 'mana/nope' does not exist; see GET /v1/aliases"


LONG = 10_000


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("mana/" + "a" * LONG, id="unknown-alias"),
        pytest.param("x/" * (LONG // 2), id="many-slashes"),
        pytest.param("/" + "m" * LONG, id="empty-provider"),
        pytest.param("nope/" + "m" * LONG, id="long-model-part"),
        pytest.param(
            "p" * LONG + "/m",
            id="long-provider-part",
        ),
    ],
)
def test_error_messages_for_long_models_stay_short(config: Config, model: str) -> None:
    with pytest.raises(ProxyError) as info:
        resolve(model, config)
    assert len(info.value.message) < 400


def test_bare_name_up_to_the_length_limit_resolves_to_ollama(config: Config) -> None:
    model = "m" * MAX_MODEL_LENGTH
    assert resolve(model, config).chain == (Target("ollama", model),)


@pytest.mark.parametrize("model", ["m" * (MAX_MODEL_LENGTH + 1), "ollama/x\r\nSet-Cookie: a=b", "gemma\nx", "a/m\x00"])
def test_overlong_or_control_character_models_are_rejected(config: Config, model: str) -> None:
    with pytest.raises(ProxyError) as info:
        resolve(model, config)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_model", "model")
