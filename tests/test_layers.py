"""The package's layers by role: every import inside `manaproxy/` runs from a higher layer to a lower one (or
within one layer), as the README's code map draws them. Read from the source with `ast`, so a new upward
arrow fails here before it becomes a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "manaproxy"

# Bottom up. A module's layer is that of the longest prefix listed.
LAYERS: list[set[str]] = [
    {  # pure or nearly: config (with the kind names), routing, bytes-level SSE, bodies, redaction, records, failures
        "config",
        "failures",
        "dotenv",
        "routing",
        "sse",
        "protocols",
        "jsonmodel",
        "headers",
        "paths",
        "body",
        "redact",
        "record",
        "errors",
        "requestid",
        "logfmt",
        "kinds",
        "systemd",
        "clients",
        "__init__",
        "__version__",
    },
    {"auth", "cors"},  # the middlewares that say who may ask: the request path reads their request keys
    {"health", "limits"},  # breakers and the tracker: no I/O; the client limit windows
    {"plan", "providers"},  # which target next (reads health); the kinds
    {
        "redislink",
        "redislimits",
        "cache",
        "gateway",
        "reload",
        "probe",
        "sharedhealth",
        "drain",
        "readtimer",
    },  # shared state (Redis, the response cache, shared limits), the runtime a reload swaps, the probe loop, the drain
    {"proxy"},  # the request path
    {"views"},  # the read-only HTTP surface
    {"metrics", "hostmetrics", "reqlog"},  # the metrics middleware and recorder (for the host too), the request log
    {"app", "server", "cli", "statuscli", "supervisor", "__main__"},  # wiring, the command and its workers' supervisor
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"manaproxy.{module} is in no layer: add it to LAYERS (and to the README's code map)")


def _module(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """What `path` imports from manaproxy, as module names relative to the package."""
    module = _module(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
        elif node.module and node.module.startswith("manaproxy."):
            base, node.module = [], node.module.removeprefix("manaproxy.")
        else:
            continue
        if node.module:
            found.add(".".join([*base, node.module]))
        else:  # `from . import probe, proxy`
            found.update(".".join([*base, alias.name]) for alias in node.names)
    return {name for name in found if name}


def _arrows() -> set[tuple[str, str]]:
    arrows = set()
    for path in PACKAGE.rglob("*.py"):
        arrows.update((_module(path), target) for target in _imports(path))
    return arrows


def test_every_import_runs_down_the_layers():
    upward = sorted((source, target) for source, target in _arrows() if _layer(target) > _layer(source))
    assert upward == [], "imports from a lower layer up: " + ", ".join(f"{s} → {t}" for s, t in upward)


def test_the_moves_of_this_layering_hold():
    arrows = _arrows()
    assert ("config", "providers") not in arrows  # config ↔ providers was a cycle; config owns KINDS
    assert not any(
        source.startswith("health") and target.split(".")[0] in {"gateway", "reload", "views"}
        for source, target in arrows
    )
    assert not (PACKAGE / "health" / "probe.py").exists()
    assert not (PACKAGE / "catalog.py").exists()


# -- the test tree -------------------------------------------------------------------------------------------

TESTS = Path(__file__).resolve().parent


def _test_module_imports(path: Path) -> set[str]:
    """The test modules `path` imports, however it spells the import (`from .test_x`, `from tests.test_x`,
    `from . import test_x`, `import tests.test_x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if not node.level and module != "tests" and not module.startswith("tests."):
                continue  # a library or manaproxy
            module = module.removeprefix("tests").lstrip(".")
            found.update([module.split(".")[0]] if module else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("tests.").split(".")[0] for alias in node.names)
    return {name for name in found if name.startswith("test_")}


def test_no_test_module_imports_another_test_module():
    """Shared helpers live in helpers.py and fakes.py (conftest.py's rule): a test module imported by another
    runs its tests' module-level setup twice and ties the two files' layouts together."""
    imports = {path.name: _test_module_imports(path) for path in sorted(TESTS.glob("*.py"))}
    crossing = {name: sorted(found) for name, found in imports.items() if found}
    assert crossing == {}


def test_the_test_module_import_check_sees_every_spelling(tmp_path):
    spellings = [
        "from .test_a import x",
        "from tests.test_b import y",
        "from . import test_c",
        "from tests import test_d",
        "import tests.test_e",
        "from .helpers import test_not_a_module_name_but_a_helper",
        "from .fakes import chat",
        "import test_f",
    ]
    path = tmp_path / "test_probe.py"
    path.write_text("\n".join(spellings) + "\n")

    assert _test_module_imports(path) == {"test_a", "test_b", "test_c", "test_d", "test_e", "test_f"}
