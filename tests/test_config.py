"""`config.parse_config` / `load_config`: env expansion, defaults, and validation errors that name their place.

Table-driven: each bad document is a small YAML text plus the place (`aliases.mana/x.chain[1]` ...) its
error message must name. `ConfigError` must be the only exception a document can ever produce.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from manaproxy.config import (
    Alias,
    AutoConcurrency,
    ConfigError,
    HealthSettings,
    ServerSettings,
    Step,
    Target,
    Timeouts,
    expand_env,
    load_config,
    parse_config,
)

from .helpers import MANA_LLM_ALIASES, MANA_LLM_ALIASES_FLOW

SHIPPED = Path(__file__).resolve().parent.parent / "aliases.yaml"

MINIMAL = """
providers:
  a:
    base_url: http://127.0.0.1:9/v1
aliases:
  mana/x:
    chain: [a/m1]
"""


def doc(providers: dict[str, Any] | None = None, aliases: dict[str, Any] | None = None, **top: Any) -> str:
    """YAML text: one provider `a` and one alias `mana/x` unless overridden, plus any other top-level keys."""
    raw: dict[str, Any] = {
        "providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}} if providers is None else providers,
        "aliases": {"mana/x": {"chain": ["a/m1"]}} if aliases is None else aliases,
        **top,
    }
    return yaml.safe_dump(raw, sort_keys=False)


def provider_doc(**spec: Any) -> str:
    """A document whose provider `a` has `spec` (base_url filled in unless given)."""
    return doc(providers={"a": {"base_url": "http://127.0.0.1:9/v1", **spec}})


def config_error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {}, source="t.yaml")
    return str(info.value)


# -- environment expansion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${V}", {"V": "x"}, "x"),
        ("${V}", {}, ""),
        ("${V}", {"V": ""}, ""),
        ("${V:-d}", {"V": "x"}, "x"),
        ("${V:-d}", {}, "d"),
        ("${V:-d}", {"V": ""}, "d"),
        ("${V:-}", {}, ""),
        ("${V:-http://h:1/p}/v1", {}, "http://h:1/p/v1"),
        ("a${V}b${W:-w}c", {"V": "1"}, "a1bwc"),
        ("$V ${ not a var} $${V}", {"V": "x"}, "$V ${ not a var} $x"),
        ("${V}", {"V": "${W}"}, "${W}"),  # one pass: a value is never expanded again
    ],
)
def test_expand_env(text: str, env: dict[str, str], expected: str) -> None:
    assert expand_env(text, env) == expected


@pytest.mark.parametrize(
    ("base_url", "env", "expected"),
    [
        ("${URL:-http://localhost:11434}/v1", {}, "http://localhost:11434/v1"),
        ("${URL:-http://localhost:11434}/v1", {"URL": ""}, "http://localhost:11434/v1"),
        ("${URL:-http://localhost:11434}/v1", {"URL": "http://10.0.0.1:8080"}, "http://10.0.0.1:8080/v1"),
        ("${URL}", {"URL": "https://api.example.test/v1/"}, "https://api.example.test/v1"),
    ],
)
def test_base_url_is_expanded_from_env(base_url: str, env: dict[str, str], expected: str) -> None:
    config = parse_config(provider_doc(base_url=base_url), env=env)
    assert config.providers["a"].base_url == expected


@pytest.mark.parametrize(
    ("api_key", "env", "key", "configured"),
    [
        ("${KEY}", {"KEY": "test-key-1"}, "test-key-1", True),
        ("${KEY}", {}, "", False),
        ("${KEY}", {"KEY": ""}, "", False),
        ("${KEY}", {"KEY": "   "}, "", False),
        ("${KEY:-test-key-2}", {}, "test-key-2", True),
        (None, {}, "", False),  # `api_key:` with no value: declared but empty
        ("", {}, "", False),
    ],
)
def test_api_key_expansion_and_configured(api_key: Any, env: dict[str, str], key: str, configured: bool) -> None:
    provider = parse_config(provider_doc(api_key=api_key), env=env).providers["a"]
    assert provider.api_key == key
    assert provider.configured is configured


def test_provider_without_api_key_is_configured() -> None:
    provider = parse_config(MINIMAL, env={}).providers["a"]
    assert provider.api_key is None
    assert provider.configured is True


def test_header_values_are_expanded_and_description_is_not() -> None:
    text = doc(
        providers={"a": {"base_url": "http://h/v1", "headers": {"X-Title": "${TITLE:-mp}", "X-Ref": "${REF}"}}},
        aliases={"mana/x": {"description": "costs ${PRICE}", "chain": ["a/m"]}},
    )
    config = parse_config(text, env={"REF": "https://example.test"})
    assert dict(config.providers["a"].headers) == {"X-Title": "mp", "X-Ref": "https://example.test"}
    assert config.aliases["mana/x"].description == "costs ${PRICE}"


def test_numbers_may_come_from_env() -> None:
    text = provider_doc(timeouts={"connect": "${CONNECT:-2.5}"}, max_concurrent="${MAXC}")
    provider = parse_config(text, env={"MAXC": "4"}).providers["a"]
    assert provider.timeouts.connect == 2.5
    assert provider.max_concurrent == 4


# -- defaults and parsed shape --------------------------------------------------------------------


def test_defaults() -> None:
    config = parse_config(MINIMAL, env={}, source="min.yaml")
    provider = config.providers["a"]
    assert provider.kind == "openai"
    assert provider.timeouts == Timeouts(connect=5.0, first_byte=30.0, idle=60.0, total=600.0)
    assert provider.max_concurrent == 0
    assert provider.probe is None
    assert dict(provider.headers) == {}
    assert config.health == HealthSettings(
        failure_threshold=2, backoff_seconds=60.0, probe_interval_seconds=30.0, probe_timeout_seconds=3.0
    )
    assert config.server == ServerSettings(
        max_body_bytes=32 * 1024 * 1024, shutdown_timeout_seconds=30.0, models_cache_seconds=60.0
    )
    assert config.default is None
    assert config.source == "min.yaml"
    assert config.aliases["mana/x"] == Alias(name="mana/x", description="", steps=(Step.single(Target("a", "m1")),))


def test_partial_sections_keep_other_defaults() -> None:
    text = doc(
        providers={"a": {"base_url": "http://h/v1", "timeouts": {"idle": 7}}},
        health={"failure_threshold": 5},
        server={"max_body_bytes": 1024},
    )
    config = parse_config(text, env={})
    assert config.providers["a"].timeouts == Timeouts(idle=7.0)
    assert config.health == HealthSettings(failure_threshold=5)
    assert config.server == ServerSettings(max_body_bytes=1024)


def test_chain_entries_keep_slashes_in_model_part() -> None:
    text = doc(aliases={"mana/x": {"chain": ["a/anthropic/claude-3-haiku", "a/qwen2.5:7b"]}}, default="mana/x")
    config = parse_config(text, env={})
    assert config.aliases["mana/x"].chain == (Target("a", "anthropic/claude-3-haiku"), Target("a", "qwen2.5:7b"))
    assert config.default == "mana/x"


def test_config_is_immutable() -> None:
    config = parse_config(MINIMAL, env={})
    with pytest.raises(TypeError):
        config.providers["b"] = config.providers["a"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.default = "mana/x"  # type: ignore[misc]


def test_summary_counts_configured_providers() -> None:
    text = doc(providers={"a": {"base_url": "http://h/v1"}, "b": {"base_url": "http://h/v1", "api_key": "${K}"}})
    summary = parse_config(text, env={}, source="s.yaml").summary()
    assert summary == "s.yaml: 2 providers (1 configured), 1 aliases, default -"


def test_repr_never_contains_the_api_key() -> None:
    text = provider_doc(api_key="${KEY}", headers={"X-Secret": "${KEY}"})
    config = parse_config(text, env={"KEY": "test-key-secret-1"})
    assert config.providers["a"].api_key == "test-key-secret-1"
    assert "test-key-secret-1" not in repr(config.providers["a"])
    assert "test-key-secret-1" not in repr(config)
    assert "test-key-secret-1" not in str(config.providers["a"])


# -- validation errors name their place -----------------------------------------------------------

BAD_DOCUMENTS = [
    pytest.param(doc(extra=1), ["top level", "unknown key 'extra'"], id="unknown-top-level-key"),
    pytest.param(provider_doc(colour="red"), ["providers.a", "unknown key 'colour'"], id="unknown-provider-key"),
    pytest.param(
        provider_doc(timeouts={"read": 1}), ["providers.a.timeouts", "unknown key 'read'"], id="unknown-timeouts-key"
    ),
    pytest.param(
        doc(aliases={"mana/x": {"chain": ["a/m1", "nope/m2"]}}),
        ["aliases.mana/x.chain[1]", "'nope'"],
        id="chain-names-undeclared-provider",
    ),
    pytest.param(
        doc(aliases={"mana/x": {"chain": ["a/m1", "a/m2", "a"]}}),
        ["aliases.mana/x.chain[2]"],
        id="chain-entry-no-slash",
    ),
    pytest.param(doc(aliases={"mana/x": {"chain": ["a/"]}}), ["aliases.mana/x.chain[0]"], id="chain-entry-no-model"),
    pytest.param(
        doc(aliases={"mana/x": {"chain": ["a/m", {"a": "m"}]}}), ["aliases.mana/x.chain[1]"], id="chain-entry-mapping"
    ),
    pytest.param(doc(aliases={"mana/x": {"chain": []}}), ["aliases.mana/x.chain", "non-empty"], id="empty-chain"),
    pytest.param(doc(aliases={"mana/x": {"chain": "a/m1"}}), ["aliases.mana/x.chain"], id="chain-not-a-list"),
    pytest.param(doc(aliases={"mana/x": {"description": "d"}}), ["aliases.mana/x.chain"], id="chain-missing"),
    pytest.param(
        doc(aliases={"mana/x": {"chain": ["a/m"], "fallback": []}}),
        ["aliases.mana/x", "unknown key 'fallback'"],
        id="unknown-alias-key",
    ),
    pytest.param(doc(aliases={"fast": {"chain": ["a/m1"]}}), ["aliases.fast", "mana/"], id="alias-outside-mana"),
    pytest.param(doc(aliases={"mana/": {"chain": ["a/m1"]}}), ["aliases.mana/", "mana/"], id="alias-without-class"),
    pytest.param(doc(default="mana/nope"), ["default", "'mana/nope'"], id="default-not-an-alias"),
    pytest.param(doc(default=["mana/x"]), ["default"], id="default-not-a-string"),
    pytest.param(provider_doc(base_url="localhost:11434/v1"), ["providers.a.base_url"], id="base-url-no-scheme"),
    pytest.param(provider_doc(base_url="ftp://h/v1"), ["providers.a.base_url"], id="base-url-ftp"),
    pytest.param(provider_doc(base_url="http://"), ["providers.a.base_url"], id="base-url-no-host"),
    pytest.param(provider_doc(base_url="${UNSET}"), ["providers.a.base_url"], id="base-url-unset-env"),
    pytest.param(doc(providers={"a": {"kind": "openai"}}), ["providers.a", "base_url"], id="base-url-missing"),
    pytest.param(provider_doc(timeouts={"connect": -1}), ["providers.a.timeouts.connect"], id="timeout-negative"),
    pytest.param(provider_doc(timeouts={"idle": 0}), ["providers.a.timeouts.idle"], id="timeout-zero"),
    pytest.param(provider_doc(timeouts={"total": math.nan}), ["providers.a.timeouts.total"], id="timeout-nan"),
    pytest.param(provider_doc(timeouts={"total": "nan"}), ["providers.a.timeouts.total"], id="timeout-nan-text"),
    pytest.param(
        provider_doc(timeouts={"first_byte": "soon"}),
        ["providers.a.timeouts.first_byte", "expected a number"],
        id="timeout-not-numeric",
    ),
    pytest.param(provider_doc(timeouts={"connect": True}), ["providers.a.timeouts.connect"], id="timeout-bool"),
    pytest.param(provider_doc(timeouts={"connect": [1]}), ["providers.a.timeouts.connect"], id="timeout-list"),
    pytest.param(provider_doc(timeouts=[1, 2]), ["providers.a.timeouts", "mapping"], id="timeouts-not-mapping"),
    pytest.param(provider_doc(kind="anthropic"), ["providers.a.kind", "'anthropic'"], id="bad-kind"),
    pytest.param(provider_doc(max_concurrent=-1), ["providers.a.max_concurrent"], id="max-concurrent-negative"),
    pytest.param(provider_doc(max_concurrent=1.5), ["providers.a.max_concurrent"], id="max-concurrent-fraction"),
    pytest.param(provider_doc(probe="models"), ["providers.a.probe", "'/'"], id="probe-not-a-path"),
    pytest.param(provider_doc(headers=["X: y"]), ["providers.a.headers"], id="headers-not-mapping"),
    pytest.param(provider_doc(headers={"X-A": None}), ["providers.a.headers.X-A"], id="header-value-null"),
    pytest.param(provider_doc(api_key=["k"]), ["providers.a.api_key"], id="api-key-list"),
    pytest.param(doc(providers={"mana": {"base_url": "http://h"}}), ["providers.mana"], id="provider-named-mana"),
    pytest.param(doc(providers={"a b": {"base_url": "http://h"}}), ["providers.a b"], id="provider-name-space"),
    pytest.param(doc(providers={"a": "http://h"}), ["providers.a", "mapping"], id="provider-not-mapping"),
    # `providers:` may be empty or absent (built-in providers); a chain entry must still name a known one.
    pytest.param(doc(providers={}), ["aliases.mana/x.chain[0]", "undeclared provider 'a'"], id="no-providers-empty"),
    pytest.param("aliases: {}\n", ["providers", "none declared and no built-in one"], id="no-providers-missing"),
    pytest.param(doc(providers=["a"]), ["providers", "mapping"], id="providers-a-list"),
    pytest.param(doc(aliases=["mana/x"]), ["aliases", "mapping"], id="aliases-a-list"),
    pytest.param(doc(health={"failure_threshold": 0}), ["health.failure_threshold"], id="threshold-zero"),
    pytest.param(doc(health={"failure_threshold": 2.5}), ["health.failure_threshold"], id="threshold-fraction"),
    pytest.param(doc(health={"backoff_seconds": -5}), ["health.backoff_seconds"], id="backoff-negative"),
    pytest.param(doc(health={"probe": 1}), ["health", "unknown key 'probe'"], id="unknown-health-key"),
    pytest.param(doc(server={"max_body_bytes": 0}), ["server.max_body_bytes"], id="body-limit-zero"),
    pytest.param(doc(server={"listen_backlog": 10.5}), ["server.listen_backlog"], id="backlog-fraction"),
    pytest.param(doc(server={"port": 1}), ["server", "unknown key 'port'"], id="unknown-server-key"),
]


@pytest.mark.parametrize(("text", "places"), BAD_DOCUMENTS)
def test_validation_error_names_its_place(text: str, places: list[str]) -> None:
    message = config_error(text)
    assert message.startswith("t.yaml: ")
    for place in places:
        assert place in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("providers:\n  a: [\n", 3),
        ("providers:\n  a:\n    base_url: http://h\n  b: {x: 1\naliases: {}\n", 5),
        ("a: b: c\n", 1),
        ("providers:\n\tb: 1\n", 2),
    ],
)
def test_yaml_syntax_error_names_the_line(text: str, line: int) -> None:
    assert f"t.yaml: line {line}: " in config_error(text)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a scalar", "42", "null", "[]"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert "expected a mapping" in config_error(text)


HOSTILE_DOCUMENTS = [
    pytest.param("- providers\n- aliases\n", id="list"),
    pytest.param("providers: 1\n", id="providers-scalar"),
    pytest.param("providers: !!set {a, b}\n", id="set"),
    pytest.param("providers:\n  a:\n    base_url: !!binary aGVsbG8=\n", id="binary-tag"),
    pytest.param("!!python/object/apply:os.system [echo hi]\n", id="python-tag"),
    pytest.param("providers:\n  1: {base_url: http://h}\n", id="int-provider-name"),
    pytest.param("providers:\n  ? [a, b]\n  : {base_url: http://h}\n", id="list-as-key"),
    pytest.param("providers:\n  a:\n    base_url: 2020-01-01\n", id="date-base-url"),
    pytest.param("providers:\n  a:\n    base_url: {x: {y: [1, 2, {z: null}]}}\n", id="nested-junk"),
    pytest.param("providers: &p\n  a: {base_url: http://h}\naliases: *p\n", id="yaml-alias-reuse"),
    pytest.param("providers:\n  a:\n    base_url: http://h\n    timeouts: {yes: 1}\n", id="bool-key"),
    pytest.param("providers:\n  a: {base_url: \x00}\n", id="nul-byte"),
    pytest.param("\ufeffproviders: [\x85\x07\x1b]\n", id="control-chars"),
    pytest.param("%YAML 9.9\n---\na: 1\n", id="bad-directive"),
    pytest.param("a: 1\n---\nb: 2\n", id="two-documents"),
    pytest.param("a: *undefined\n", id="undefined-anchor"),
    pytest.param(
        "[" * 700 + "]" * 700,
        id="deeply-nested-list",
    ),
    pytest.param(
        "providers: 1" + "0" * 5000 + "\n",
        id="int-over-4300-digits",
    ),
    pytest.param(
        provider_doc(timeouts={"connect": 10**400}),
        id="huge-int-timeout",
    ),
    pytest.param(
        provider_doc(max_concurrent=10**400),
        id="huge-int-max-concurrent",
    ),
    pytest.param(
        provider_doc(base_url="http://[::1/v1"),
        id="base-url-bad-ipv6",
    ),
]


@pytest.mark.parametrize("text", HOSTILE_DOCUMENTS)
def test_hostile_documents_raise_only_config_error(text: str) -> None:
    try:
        parse_config(text, env={}, source="t.yaml")
    except ConfigError as exc:
        problem = "" if str(exc).startswith("t.yaml:") else f"ConfigError without its source: {exc}"
    except BaseException as exc:  # the point is that nothing else escapes
        # Fail outside the handler: a chained RecursionError traceback takes pytest a second to render.
        problem = f"{type(exc).__name__} escaped parse_config: {str(exc)[:200]}"
    else:
        problem = "a hostile document was accepted"
    if problem:
        pytest.fail(problem)


@pytest.mark.parametrize("value", [math.inf, "inf", "${T:-inf}"])
def test_infinite_timeout_is_rejected(value: Any) -> None:
    assert "providers.a.timeouts.total" in config_error(provider_doc(timeouts={"total": value}))


@pytest.mark.parametrize("base_url", ["http://h:abc/v1", "http://h:99999/v1"])
def test_base_url_with_bad_port_is_rejected(base_url: str) -> None:
    assert "providers.a.base_url" in config_error(provider_doc(base_url=base_url))


# -- load_config ----------------------------------------------------------------------------------


def test_load_config_reads_and_expands(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(provider_doc(api_key="${KEY}"), encoding="utf-8")
    config = load_config(path, env={"KEY": "test-key-1"})
    assert config.source == str(path)
    assert config.providers["a"].api_key == "test-key-1"


def test_load_config_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(provider_doc(api_key="${MANAPROXY_TEST_KEY}"), encoding="utf-8")
    monkeypatch.setenv("MANAPROXY_TEST_KEY", "test-key-env")
    assert load_config(path).providers["a"].api_key == "test-key-env"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, env={})


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\x00\x01garbage\x80\x81", bytes(range(256)), b"providers:\n  a: {base_url: \xc3\x28}\n"],
)
def test_load_config_binary_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(str(path))


def test_load_config_error_names_the_file_and_place(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(doc(aliases={"mana/x": {"chain": ["a/m", "ghost/m"]}}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: aliases.mana/x.chain[1]: ")


# -- the shipped aliases.yaml ---------------------------------------------------------------------

SHIPPED_PROVIDERS = {"ollama", "openrouter", "groq", "google"}  # built in, named by its chains (together is not)
SHIPPED_ALIASES = {"mana/fast-text", "mana/long-form", "mana/structured", "mana/reasoning", "mana/vision"}


def test_shipped_config_parses_with_empty_env() -> None:
    config = load_config(SHIPPED, env={})
    assert set(config.providers) == SHIPPED_PROVIDERS
    assert set(config.aliases) == SHIPPED_ALIASES
    assert config.default in config.aliases
    assert config.providers["ollama"].base_url == "http://localhost:11434/v1"
    assert config.providers["google"].kind == "google"
    # Without keys in the environment only the keyless local provider is usable.
    assert {name for name, p in config.providers.items() if p.configured} == {"ollama"}
    for alias in config.aliases.values():
        assert alias.chain
        assert all(target.provider in config.providers for target in alias.chain)


def test_shipped_config_groq_is_configured_with_key_in_env() -> None:
    config = load_config(SHIPPED, env={"GROQ_API_KEY": "test-key-1"})
    assert config.providers["groq"].configured
    assert config.providers["groq"].api_key == "test-key-1"
    assert "together" not in config.providers  # named by no chain and no TOGETHER_API_KEY
    assert not config.providers["openrouter"].configured
    assert "test-key-1" not in repr(config)


def test_shipped_config_env_overrides_base_url() -> None:
    config = load_config(SHIPPED, env={"OLLAMA_URL": "http://127.0.0.1:9999"})
    assert config.providers["ollama"].base_url == "http://127.0.0.1:9999/v1"


# -- built-in providers (mana-llm's, from its environment) ----------------------------------------------


@pytest.mark.parametrize("text", [MANA_LLM_ALIASES, MANA_LLM_ALIASES_FLOW], ids=["block-lists", "flow-lists"])
def test_mana_llm_file_loads_with_built_in_providers(text: str) -> None:
    config = parse_config(text, env={"GROQ_API_KEY": "test-key-builtin-1"})
    assert list(config.providers) == ["ollama", "openrouter", "groq", "google"]  # the ones its chains name
    assert all(spec.builtin for spec in config.providers.values())
    assert {name for name, spec in config.providers.items() if spec.configured} == {"ollama", "groq"}
    ollama, openrouter, groq, google = config.providers.values()
    assert ollama.base_url == "http://localhost:11434/v1"
    assert ollama.api_key is None
    assert ollama.timeouts == Timeouts(connect=5, first_byte=120, idle=60, total=120)
    assert openrouter.base_url == "https://openrouter.ai/api/v1"
    assert dict(openrouter.headers) == {
        "HTTP-Referer": "https://github.com/manaproxy/manaproxy",
        "X-Title": "manaproxy",
    }
    assert (groq.base_url, groq.api_key) == ("https://api.groq.com/openai/v1", "test-key-builtin-1")
    assert (google.kind, google.configured) == ("google", False)
    assert [str(t) for t in config.aliases["mana/vision"].chain] == [
        "ollama/llava:7b",
        "google/gemini-2.0-flash-exp",
        "openrouter/openai/gpt-4o",
    ]
    assert config.aliases["mana/reasoning"].description == "Agent missions, tool calls, multi-step plans"
    assert config.default == "mana/fast-text"


def test_built_in_providers_read_their_variables() -> None:
    env = {
        "OLLAMA_URL": "http://gpu:11434/",
        "OLLAMA_TIMEOUT": "30",
        "TOGETHER_API_KEY": " test-key-together ",
        "TOGETHER_BASE_URL": "http://127.0.0.1:9/together/v1",
        "OPENROUTER_REFERER": "https://mana.how",
        "GROQ_BASE_URL": "",  # empty: the default, as ${VAR:-default}
    }
    config = parse_config(MANA_LLM_ALIASES, env=env)
    assert list(config.providers) == ["ollama", "openrouter", "groq", "together", "google"]  # together: key set
    assert config.providers["ollama"].base_url == "http://gpu:11434/v1"
    assert config.providers["ollama"].timeouts == Timeouts(connect=5, first_byte=30, idle=30, total=30)
    assert config.providers["together"].base_url == "http://127.0.0.1:9/together/v1"
    assert config.providers["together"].api_key == "test-key-together"
    assert config.providers["openrouter"].headers["HTTP-Referer"] == "https://mana.how"
    assert config.providers["groq"].base_url == "https://api.groq.com/openai/v1"


def test_a_built_in_provider_is_there_only_when_named_or_asked_for() -> None:
    text = doc(aliases={"mana/x": {"chain": ["a/m1"]}})
    assert list(parse_config(text, env={}).providers) == ["a"]
    asked = parse_config(text, env={"GOOGLE_API_KEY": "test-key-g", "OLLAMA_URL": "http://127.0.0.1:9"})
    assert [(name, spec.builtin) for name, spec in asked.providers.items()] == [
        ("a", False),
        ("ollama", True),
        ("google", True),
    ]
    named = parse_config(doc(aliases={"mana/x": {"chain": ["a/m1", "groq/m2"]}}), env={})
    assert list(named.providers) == ["a", "groq"]
    assert not named.providers["groq"].configured  # named, but GROQ_API_KEY unset: skipped like a declared one


def test_a_declared_provider_replaces_the_built_in_one_wholly() -> None:
    text = doc(
        providers={"ollama": {"base_url": "http://127.0.0.1:9/v1"}, "groq": {"base_url": "http://127.0.0.1:8/v1"}},
        aliases={"mana/x": {"chain": ["ollama/m", "groq/m"]}},
    )
    config = parse_config(text, env={"OLLAMA_URL": "http://other:1", "OLLAMA_TIMEOUT": "7", "GROQ_API_KEY": "k"})
    ollama, groq = config.providers["ollama"], config.providers["groq"]
    assert (ollama.builtin, ollama.base_url, ollama.timeouts) == (False, "http://127.0.0.1:9/v1", Timeouts())
    assert (groq.builtin, groq.api_key, groq.configured) == (False, None, True)  # no key: none is sent
    assert list(config.providers) == ["ollama", "groq"]


@pytest.mark.parametrize(
    ("text", "env", "places"),
    [
        (
            MANA_LLM_ALIASES.replace("groq/llama-3.1-8b-instant", "grok/x", 1),
            {},
            ["aliases.mana/fast-text.chain[1]", "'grok'"],
        ),
        (MANA_LLM_ALIASES, {"OLLAMA_TIMEOUT": "soon"}, ["built-in provider ollama", "OLLAMA_TIMEOUT"]),
        (MANA_LLM_ALIASES, {"OLLAMA_TIMEOUT": "0"}, ["built-in provider ollama", "OLLAMA_TIMEOUT"]),
        (MANA_LLM_ALIASES, {"OLLAMA_URL": "gpu:11434"}, ["built-in provider ollama (from OLLAMA_URL", "base_url"]),
        (MANA_LLM_ALIASES, {"GROQ_BASE_URL": "ftp://x"}, ["built-in provider groq (from GROQ_API_KEY, GROQ_BASE_URL"]),
        ("aliases: {}\n", {}, ["providers", "none declared"]),
    ],
    ids=["unknown-provider", "timeout-not-a-number", "timeout-zero", "bad-ollama-url", "bad-groq-url", "nothing"],
)
def test_built_in_provider_errors_name_their_place(text: str, env: dict[str, str], places: list[str]) -> None:
    message = config_error(text, env)
    for place in places:
        assert place in message


def test_a_built_in_key_never_reaches_repr_or_summary() -> None:
    config = parse_config(MANA_LLM_ALIASES, env={"OPENROUTER_API_KEY": "test-key-or-secret"})
    assert config.providers["openrouter"].configured
    assert "test-key-or-secret" not in repr(config) + config.summary()


# -- clients, limits, stream_usage (issue 19) ------------------------------------------------------------------


def _with(extra: str) -> str:
    return MINIMAL + extra


def test_clients_section_parses_keys_models_and_limits():
    config = parse_config(
        _with(
            """
clients:
  telegram-bot:
    key: ${BOT_KEY}
    models: [mana/x, a/*, a/m1, gemma3:4b]
    requests_per_minute: 120
    tokens_per_minute: "200000"
    tokens_per_day: 5000000
  chat.backend_2:
    keys: [sk-one, "${ROTATED:-sk-two}", "${UNSET}"]
limits: {backend: memory, on_backend_error: closed}
"""
        ).replace("aliases:", "  ollama:\n    base_url: http://127.0.0.1:9/v1\naliases:"),
        env={"BOT_KEY": " sk-bot "},
    )
    bot = config.clients["telegram-bot"]
    assert bot.keys == ("sk-bot",)
    assert bot.models == ("mana/x", "a/*", "a/m1", "gemma3:4b")
    assert (bot.requests_per_minute, bot.tokens_per_minute, bot.tokens_per_day) == (120, 200000, 5000000)
    assert config.clients["chat.backend_2"].keys == ("sk-one", "sk-two")  # an empty expansion lets no one in
    assert config.clients["chat.backend_2"].requests_per_minute is None
    assert (config.limits.backend, config.limits.on_backend_error) == ("memory", "closed")
    assert "sk-bot" not in repr(config)


def test_defaults_without_clients():
    config = parse_config(MINIMAL, env={})
    assert dict(config.clients) == {}
    assert (config.limits.backend, config.limits.on_backend_error) == ("memory", "open")
    assert config.providers["a"].stream_usage == "inject"


@pytest.mark.parametrize(
    ("extra", "place"),
    [
        ("clients:\n  Bad_Name: {key: k}\n", "clients.Bad_Name"),
        ("clients:\n  anonymous: {key: k}\n", "clients.anonymous"),
        ("clients:\n  a: {}\n", "clients.a: needs exactly one of 'key' or 'keys'"),
        ("clients:\n  a: {key: k, keys: [j]}\n", "clients.a: needs exactly one"),
        ("clients:\n  a: {keys: []}\n", "clients.a.keys"),
        ("clients:\n  a: {key: 'k,j'}\n", "clients.a.key: a key cannot contain commas"),
        ("clients:\n  a: {keys: [k, k]}\n", "clients.a.keys[1]: the same key is listed twice"),
        ("clients:\n  a: {key: k1}\n  b: {key: k1}\n", "clients.b: shares a key with client 'a'"),
        ("clients:\n  a: {key: k, models: mana/x}\n", "clients.a.models"),
        ("clients:\n  a: {key: k, models: [mana/nope]}\n", "clients.a.models[0]: 'mana/nope' is not a declared alias"),
        ("clients:\n  a: {key: k, models: [zz/m]}\n", "clients.a.models[0]: 'zz/m' names undeclared provider"),
        ("clients:\n  a: {key: k, requests_per_minute: 0}\n", "clients.a.requests_per_minute"),
        ("clients:\n  a: {key: k, tokens_per_day: 1.5}\n", "clients.a.tokens_per_day"),
        ("clients:\n  a: {key: k, budget: 5}\n", "clients.a: unknown key 'budget'"),
        ("limits: {backend: redis}\n", "limits.backend: 'redis' needs redis.url"),
        ("limits: {backend: disk}\n", "limits.backend"),
        ("limits: {on_backend_error: maybe}\n", "limits.on_backend_error"),
        ("limits: {window: 5}\n", "limits: unknown key 'window'"),
    ],
)
def test_client_and_limit_errors_name_their_place(extra, place):
    with pytest.raises(ConfigError, match=re.escape(place)) as caught:
        parse_config(_with(extra), env={})
    assert "k1" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("{base_url: http://127.0.0.1:9/v1, stream_usage: passthrough}", None),
        ("{base_url: http://127.0.0.1:9/v1, stream_usage: inject}", None),
        ("{base_url: http://127.0.0.1:9/v1, stream_usage: sometimes}", "providers.b.stream_usage"),
        ("{kind: google, api_key: x, stream_usage: inject}", "providers.b.stream_usage: applies only to kind openai"),
    ],
)
def test_stream_usage(spec, error):
    text = MINIMAL.replace("aliases:", f"  b: {spec}\naliases:")
    if error is None:
        assert parse_config(text, env={}).providers["b"].stream_usage in ("inject", "passthrough")
    else:
        with pytest.raises(ConfigError, match=re.escape(error)):
            parse_config(text, env={})


# -- redis: and cache: (issue 18) ------------------------------------------------------------------------------


def test_cache_and_redis_defaults() -> None:
    config = parse_config(MINIMAL, env={}, source="t.yaml")
    assert (config.redis.url, config.redis.timeout_seconds) == ("", 0.05)
    assert config.cache.backend == "memory"
    assert (config.cache.ttl_seconds, config.cache.max_bytes, config.cache.max_entry_bytes) == (3600, 2**28, 2**22)
    assert config.cache.direct is False
    assert config.aliases["mana/x"].cache_ttl is None


def test_the_documented_cache_section_reads_from_the_environment() -> None:
    text = doc(
        aliases={
            "mana/x": {"chain": ["a/m1"], "cache": True},
            "mana/y": {"chain": ["a/m1"], "cache": {"ttl_seconds": 86400}},
            "mana/z": {"chain": ["a/m1"], "cache": False},
        },
        redis={"url": "${REDIS_URL:-}", "timeout_seconds": 0.05},
        cache={"backend": "${CACHE_BACKEND:-memory}", "ttl_seconds": "${CACHE_TTL:-3600}"},
    )
    env = {"REDIS_URL": "redis://:hunter2@127.0.0.1:6379/0", "CACHE_BACKEND": "redis", "CACHE_TTL": "60"}
    config = parse_config(text, env=env, source="t.yaml")
    assert config.redis.url == "redis://:hunter2@127.0.0.1:6379/0"
    assert config.redis.redacted_url == "redis://***@127.0.0.1:6379/0"
    assert "hunter2" not in repr(config)
    assert (config.cache.backend, config.cache.ttl_seconds) == ("redis", 60)
    assert [config.aliases[name].cache_ttl for name in ("mana/x", "mana/y", "mana/z")] == [60, 86400, None]

    unset = parse_config(text, env={}, source="t.yaml")
    assert (unset.redis.url, unset.cache.backend, unset.aliases["mana/x"].cache_ttl) == ("", "memory", 3600)


@pytest.mark.parametrize(
    ("top", "aliases", "place"),
    [
        ({"cache": {"backend": "redis"}}, None, "cache.backend: 'redis' needs redis.url"),
        ({"cache": {"backend": "disk"}}, None, "cache.backend: unknown backend"),
        ({"cache": {"ttl": 5}}, None, "cache: unknown key 'ttl'"),
        ({"cache": {"ttl_seconds": 0}}, None, "cache.ttl_seconds: must be >= 0.001"),
        ({"cache": {"max_bytes": 1.5}}, None, "cache.max_bytes: expected a whole number"),
        ({"cache": {"direct": "yes"}}, None, "cache.direct: expected true or false"),
        ({"redis": {"url": "http://127.0.0.1:6379"}}, None, "redis.url: 'http://127.0.0.1:6379' is not a redis://"),
        ({"redis": {"url": "redis://:hunter2@h:99999"}}, None, "redis.url: "),
        ({"redis": {"timeout_seconds": 0}}, None, "redis.timeout_seconds: must be >= 0.001"),
        ({}, {"mana/x": {"chain": ["a/m1"], "cache": "yes"}}, "aliases.mana/x.cache: expected a mapping"),
        ({}, {"mana/x": {"chain": ["a/m1"], "cache": {"ttl": 1}}}, "aliases.mana/x.cache: unknown key 'ttl'"),
        ({}, {"mana/x": {"chain": ["a/m1"], "cache": {"ttl_seconds": -1}}}, "aliases.mana/x.cache.ttl_seconds"),
    ],
)
def test_cache_and_redis_errors_name_their_place(top: dict[str, Any], aliases: Any, place: str) -> None:
    message = config_error(doc(aliases=aliases, **top))
    assert f"t.yaml: {place}" in message
    assert "hunter2" not in message


@pytest.mark.parametrize(
    ("value", "expected"), [("1", 1), ("4", 4), ("auto", "auto"), ('"auto"', "auto"), ("256", 256)]
)
def test_server_workers_is_a_count_or_auto(value: str, expected: object) -> None:
    config = parse_config(f"{MANA_LLM_ALIASES}\nserver: {{workers: {value}}}\n", env={})
    assert config.server.workers == expected
    assert parse_config(MANA_LLM_ALIASES, env={}).server.workers == 1


@pytest.mark.parametrize(
    ("value", "words"),
    [("0", "must be >= 1"), ("2.5", "whole number"), ("many", "expected a number"), ("257", "at most 256")],
)
def test_server_workers_refuses_what_is_no_count(value: str, words: str) -> None:
    message = config_error(f"{MANA_LLM_ALIASES}\nserver: {{workers: {value}}}\n", {})
    assert "server.workers" in message
    assert words in message


def test_max_concurrent_auto_and_its_bounds():
    provider = parse_config(provider_doc(max_concurrent="auto"), env={}).providers["a"]
    assert (provider.max_concurrent, provider.auto_concurrency) == (0, AutoConcurrency(1, 64))
    text = provider_doc(max_concurrent="auto", min_concurrent=2, max_concurrent_limit=8)
    assert parse_config(text, env={}).providers["a"].auto_concurrency == AutoConcurrency(2, 8)
    assert parse_config(provider_doc(max_concurrent=4), env={}).providers["a"].auto_concurrency is None


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"max_concurrent": 4, "min_concurrent": 2}, "providers.a.min_concurrent"),
        ({"max_concurrent_limit": 8}, "providers.a.max_concurrent_limit"),
        ({"max_concurrent": "auto", "min_concurrent": 0}, "providers.a.min_concurrent"),
        (
            {"max_concurrent": "auto", "min_concurrent": 4, "max_concurrent_limit": 2},
            "providers.a.max_concurrent_limit",
        ),
        ({"max_concurrent": "many"}, "providers.a.max_concurrent"),
    ],
    ids=["min-without-auto", "limit-without-auto", "min-zero", "limit-under-min", "not-a-number"],
)
def test_max_concurrent_auto_refuses(spec, where):
    assert where in config_error(provider_doc(**spec))


def test_a_pool_member_may_have_a_limit_of_its_own():
    chain = [
        [{"target": "a/m", "max_concurrent": "auto", "max_concurrent_limit": 4}, {"target": "a/n", "max_concurrent": 2}]
    ]
    text = doc(providers={"a": {"base_url": "http://127.0.0.1:9/v1"}}, aliases={"mana/x": {"chain": chain}})
    first, second = parse_config(text, env={}).aliases["mana/x"].steps[0].members
    assert (first.max_concurrent, first.auto_concurrency) == (0, AutoConcurrency(1, 4))
    assert (second.max_concurrent, second.auto_concurrency) == (2, None)
    chain = [[{"target": "a/m", "min_concurrent": 2}]]
    text = doc(providers={"a": {"base_url": "http://127.0.0.1:9/v1"}}, aliases={"mana/x": {"chain": chain}})
    assert "aliases.mana/x.chain[0][0].min_concurrent" in config_error(text)


# -- limits: {backend: redis} (issue 19) -----------------------------------------------------------------------


def test_limits_backend_redis_uses_the_redis_section() -> None:
    text = _with("redis: {url: '${REDIS_URL:-}'}\nlimits: {backend: redis, on_backend_error: closed}\n")
    config = parse_config(text, env={"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert (config.limits.backend, config.limits.on_backend_error) == ("redis", "closed")
    with pytest.raises(ConfigError, match=re.escape("limits.backend: 'redis' needs redis.url")):
        parse_config(text, env={})
    assert parse_config(_with("limits: {backend: ''}\n"), env={}).limits.backend == "memory"


def test_shared_health_is_off_by_default_and_needs_redis() -> None:
    assert parse_config(doc(), env={}, source="t.yaml").health.shared is False
    shared = parse_config(doc(health={"shared": True}, redis={"url": "redis://127.0.0.1:6379/0"}), env={}, source="t")
    assert shared.health.shared is True
    assert "t.yaml: health.shared: true needs redis.url" in config_error(doc(health={"shared": True}))
    assert "t.yaml: health.shared: expected true or false" in config_error(doc(health={"shared": "yes"}))
