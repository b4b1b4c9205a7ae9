"""setup.cfg declares what the code imports: every third-party module manaproxy/ imports comes from a
distribution in `install_requires`, and what only the bench uses stays out of it (in the `bench` extra)."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(key: str, section: str = "options") -> set[str]:
    """The distribution names of one requirements list of setup.cfg (`install_requires`, or an extra)."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config[section][key].strip().splitlines()
    return {_normalized(re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0]) for line in lines if line.strip()}


def third_party_imports(tree: Path) -> dict[str, str]:
    """Top-level module → the first file importing it, for every absolute import outside the standard library."""
    found: dict[str, str] = {}
    for path in sorted(tree.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top != tree.name:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_every_module_manaproxy_imports_is_declared() -> None:
    declared = _requirements("install_requires")
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: where
        for module, where in third_party_imports(ROOT / "manaproxy").items()
        if not declared & {_normalized(dist) for dist in providers.get(module, [module])}
    }
    assert undeclared == {}, f"imported but not in setup.cfg install_requires: {undeclared}"


@pytest.mark.parametrize(
    ("distribution", "module"),
    [
        ("aiohttp-sse", "aiohttp_sse"),  # the bench's fake upstream streams with it
        ("py-spy", None),  # a command: bench/run.py's profile
    ],
)
def test_what_only_the_bench_uses_is_in_the_bench_extra(distribution: str, module: str | None) -> None:
    assert distribution in _requirements("bench", "options.extras_require")
    assert distribution not in _requirements("install_requires")
    if module is not None:
        assert module not in third_party_imports(ROOT / "manaproxy")
        assert module in third_party_imports(ROOT / "bench")
