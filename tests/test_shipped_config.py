"""The shipped `aliases.yaml`, as `make run` serves it: every provider keeps its own name (a loop variable
once renamed `openrouter` after its last header, `X-Title`) in the config, `/v1/health`, `/v1/aliases` and
the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from manaproxy.config import load_config

SHIPPED = Path(__file__).resolve().parent.parent / "aliases.yaml"
KEYS = {
    name: "test-key-shipped-0123"
    for name in ("GROQ_API_KEY", "OPENROUTER_API_KEY", "TOGETHER_API_KEY", "GOOGLE_API_KEY")
}
# The shipped file is mana-llm's: no `providers:`, every provider built in. `together` is named by no chain:
# it is there when its key is set (for `together/...` requests), as mana-llm had it.
PROVIDERS = ["ollama", "openrouter", "groq", "together", "google"]
NAMED = ["ollama", "openrouter", "groq", "google"]


@pytest.mark.parametrize(("env", "expected"), [({}, NAMED), (KEYS, PROVIDERS)], ids=["no-keys", "all-keys"])
def test_every_shipped_provider_keeps_its_name(env, expected):
    config = load_config(SHIPPED, env=env)
    assert list(config.providers) == expected
    assert [spec.name for spec in config.providers.values()] == expected
    assert all(spec.builtin for spec in config.providers.values())
    assert dict(config.providers["openrouter"].headers) == {
        "HTTP-Referer": "https://github.com/manaproxy/manaproxy",
        "X-Title": "manaproxy",
    }


async def test_the_shipped_config_names_every_provider_in_health_and_metrics(make_proxy):
    proxy = await make_proxy(SHIPPED.read_text(), env=KEYS)

    health = await (await proxy.client.get("/v1/health")).json()
    aliases = await (await proxy.client.get("/v1/aliases")).json()
    metrics = await (await proxy.client.get("/metrics")).text()

    assert list(health["providers"]) == PROVIDERS
    targets = {entry["target"].split("/")[0] for alias in aliases["aliases"] for entry in alias["entries"]}
    assert targets == set(NAMED)
    for name in PROVIDERS:
        assert f'mana_llm_provider_healthy{{provider="{name}"}}' in metrics
    assert "X-Title" not in metrics + str(health)


def test_the_routing_examples_stay_valid():
    """docs/routing-examples.yaml (declared providers, pools, hedging) loads: declared names replace built-in
    ones, the rest come built in."""
    config = load_config(SHIPPED.parent / "docs" / "routing-examples.yaml", env=KEYS)
    assert [(name, spec.builtin) for name, spec in config.providers.items()] == [
        ("ollama", False),
        ("gpu2", False),
        ("groq", False),
        ("openrouter", False),
        ("together", True),
        ("google", True),
    ]
    fast = config.aliases["mana/fast-text"]
    assert [step.pool for step in fast.steps] == [True, True, False]
    assert fast.hedge is not None
    assert fast.hedge.auto
