"""`statuscli.assess`: the verdict `manaproxy status` exits with, from the three documents alone; and its colours."""

from __future__ import annotations

from typing import Any

import pytest

from manaproxy.statuscli import Snapshot, assess, render


def provider(status: str = "healthy", **models: str) -> dict[str, Any]:
    item = {"status": status, "breaker": "closed", "since_unix": None, "consecutive_failures": 0, "last_error": None}
    return {
        **item,
        "unhealthy_until_unix": None,
        "in_flight": 0,
        "max_concurrent": 0,
        "models": {
            name: {**item, "status": value, "unhealthy_until_unix": None, "in_flight": 0}
            for name, value in models.items()
        },
    }


def alias(serving: str | None, *reasons: str | None) -> dict[str, Any]:
    entries = [{"target": f"p/m{i}", "available": reason is None, "reason": reason} for i, reason in enumerate(reasons)]
    return {"name": "mana/x", "serving": serving, "entries": entries}


def snapshot(
    overall: str, providers: dict[str, Any], aliases: list[dict[str, Any]], reload: str | None = None
) -> Snapshot:
    reloads = [] if reload is None else [{"time_unix": 1.0, "result": reload, "error": None}]
    health = {"status": overall, "providers": providers, "reloads": reloads}
    return Snapshot(health, {"aliases": aliases}, {"failures": []}, 2.0)


@pytest.mark.parametrize(
    ("case", "verdict"),
    [
        (snapshot("healthy", {"a": provider()}, [alias("p/m0", None)]), "healthy"),
        # a provider without a key is a choice, not an incident
        (
            snapshot(
                "healthy", {"a": provider(), "b": provider("unconfigured")}, [alias("p/m1", "unconfigured", None)]
            ),
            "healthy",
        ),
        (snapshot("healthy", {"a": provider(m="rate_limited")}, [alias("p/m1", "rate_limited", None)]), "degraded"),
        (
            snapshot("degraded", {"a": provider("unhealthy"), "b": provider()}, [alias("p/m1", "unhealthy", None)]),
            "degraded",
        ),
        (snapshot("healthy", {"a": provider()}, [alias("p/m0", None)], reload="failure"), "degraded"),
        (snapshot("healthy", {"a": provider()}, [alias("p/m0", None)], reload="success"), "healthy"),
        (snapshot("healthy", {"a": provider(m="unhealthy")}, [alias(None, "unhealthy")]), "unhealthy"),
        (snapshot("unhealthy", {"a": provider("unhealthy")}, []), "unhealthy"),
    ],
)
def test_assess(case: Snapshot, verdict: str) -> None:
    status, reasons = assess(case)
    assert status == verdict
    assert bool(reasons) == (verdict != "healthy")


def test_status_words_are_coloured_only_when_asked() -> None:
    case = snapshot("degraded", {"a": provider("unhealthy"), "b": provider()}, [alias("p/m1", "unhealthy", None)])
    plain = "\n".join(render(case, "http://x", colour=False))
    coloured = "\n".join(render(case, "http://x", colour=True))
    assert "\x1b[" not in plain
    assert "\x1b[31munhealthy\x1b[0m" in coloured
    assert "\x1b[32mhealthy\x1b[0m" in coloured
    assert "\x1b[33mdegraded\x1b[0m" in coloured
