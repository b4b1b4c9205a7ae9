"""deploy/: the systemd unit passes `systemd-analyze verify` as shipped, the env example lists every
variable with placeholders only, and deploy/README.md stays true to the code it documents."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from manaproxy.config import BUILTIN_PROVIDERS, load_config

from .fakes import status_reply
from .helpers import FIELDS, build_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "manaproxy.service"
ENV_EXAMPLE = DEPLOY / "manaproxy.env.example"
README = DEPLOY / "README.md"
ALIASES = ROOT / "aliases.yaml"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file, by key (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def fake_root(tmp_path: Path, unit_text: str) -> Path:
    """A file system root holding the unit exactly as given, stub executables at the paths its Exec*
    lines name, and the one target systemd needs to load a service's default dependencies."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/manaproxy.service").write_text(unit_text)
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / "sysinit.target").write_text("[Unit]\nDescription=System Initialization\n")
    settings = unit_settings(unit_text)
    for key in ("ExecStart", "ExecReload", "ExecStartPre", "ExecStop"):
        for command in settings.get(key, []):
            binary = root / shlex.split(command.lstrip("-@:+!"))[0].lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\nexit 0\n")
            binary.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=30, check=False, env={"LANG": "C.UTF-8"}
    )


@needs_systemd_analyze
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    root = fake_root(tmp_path, UNIT.read_text())
    result = analyze("verify", "--man=no", f"--root={root}", "manaproxy.service")
    # verify warns about unknown keys and bad values yet exits 0: any output at all is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_as_used_here_does_catch_mistakes(tmp_path):
    """The check above can fail: a misspelt key, a bad value or a missing binary all make noise."""
    broken = UNIT.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs=").replace("Type=notify", "Type=notifyy")
    result = analyze("verify", "--man=no", f"--root={fake_root(tmp_path, broken)}", "manaproxy.service")
    assert "Unknown key" in result.stderr
    assert "Failed to parse service type" in result.stderr

    root = fake_root(tmp_path / "missing", UNIT.read_text())
    (root / "opt/manaproxy/venv/bin/manaproxy").unlink()
    result = analyze("verify", "--man=no", f"--root={root}", "manaproxy.service")
    assert result.returncode != 0
    assert "/opt/manaproxy/venv/bin/manaproxy" in result.stderr


@needs_systemd_analyze
def test_the_unit_is_hardened(tmp_path):
    root = fake_root(tmp_path, UNIT.read_text())
    result = analyze("security", "--offline=yes", f"--root={root}", "--no-pager", "manaproxy.service")
    match = re.search(r"Overall exposure level for manaproxy\.service: ([0-9.]+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_the_unit_runs_serve_notifies_reloads_and_drains():
    settings = unit_settings(UNIT.read_text())
    single = {key: values[-1] for key, values in settings.items()}
    assert single["Type"] == "notify"
    assert single["ExecStart"] == "/opt/manaproxy/venv/bin/manaproxy serve --config /etc/manaproxy/aliases.yaml"
    assert settings["ExecReload"] == [
        "/opt/manaproxy/venv/bin/manaproxy check --config /etc/manaproxy/aliases.yaml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert single["EnvironmentFile"] == "/etc/manaproxy/manaproxy.env"
    assert single["Restart"] == "on-failure"
    assert single["RestartPreventExitStatus"] == "2"  # cli.EXIT_INVALID_CONFIG
    assert single["DynamicUser"] == "yes"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
    ):
        assert single[key] == "yes", key
    assert single["ProtectSystem"] == "strict"
    assert single["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert single["CapabilityBoundingSet"] == ""
    # systemd must not kill a drain that manaproxy is still allowed to run.
    timeout_stop = float(single["TimeoutStopSec"].removesuffix("s"))
    drain = load_config(ALIASES, env={}).server.shutdown_timeout_seconds
    assert timeout_stop >= drain + 10


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=value: {line!r}"
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), key
            values[key] = value
    return values


def test_the_env_example_lists_every_variable_with_placeholders_only():
    values = env_example()
    code = "\n".join(line.split("#", 1)[0] for line in ALIASES.read_text().splitlines())  # not the comments
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", code))
    builtin = {name for variables in BUILTIN_PROVIDERS.values() for name in variables}  # the shipped file's providers
    assert {"PORT", "LOG_LEVEL", "MANAPROXY_API_KEYS", "CORS_ORIGINS"} | referenced | builtin <= set(values)
    for key, value in values.items():
        if re.search(r"KEY|TOKEN|SECRET", key):
            assert value == "", f"{key} must be an empty placeholder"
    assert not re.search(r"\b(sk-|gsk_|AIza|xai-)\w", ENV_EXAMPLE.read_text())


def test_the_shipped_config_is_valid_with_the_env_example():
    config = load_config(ALIASES, env=env_example())
    assert config.default in config.aliases
    # No key in the example: every keyed provider is unconfigured, skipped rather than failing with a 401.
    assert {name for name, spec in config.providers.items() if spec.configured} == {"ollama"}


# -- deploy/README.md stays true ------------------------------------------------------------------------


def readme() -> str:
    return README.read_text()


def test_readme_documents_the_operator_flow():
    text = readme()
    for needle in (
        "manaproxy check --config /etc/manaproxy/aliases.yaml",
        "systemctl reload manaproxy",
        "systemctl enable --now manaproxy",
        "journalctl -u manaproxy",
        "/v1/health",
        "/v1/aliases",
        "/opt/manaproxy/venv",
        "STOPPING=1",
        "READY=1",
    ):
        assert needle in text, needle
    # check comes before reload in the reload recipe.
    recipe = text[text.index("## Change the configuration") :]
    assert recipe.index("manaproxy check") < recipe.index("systemctl reload manaproxy")


def test_readme_documents_every_request_log_field():
    text = readme()
    table = text[text.index("### One line per request") : text.index("### Other lines")]
    documented = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", table, flags=re.MULTILINE)
    names = [name for pair in documented for name in pair if name]
    assert names == FIELDS


def json_blocks(text: str) -> list[object]:
    return [yaml.safe_load(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)]


async def test_readme_examples_have_the_real_shapes(make_upstream, make_proxy):
    """The README's example outputs carry exactly the keys the endpoints really return."""
    up = await make_upstream("up")
    down = await make_upstream("down")
    down.default = status_reply(503)
    config = build_config(
        {"up": up, "down": down, "nokey": {"base_url": up, "api_key": "${NOKEY}"}},
        {"mana/x": ["down/m", "nokey/m", "up/m"]},
        health={"failure_threshold": 1},
    )
    proxy = await make_proxy(config)
    await proxy.client.post("/v1/chat/completions", json={"model": "mana/x", "messages": []})
    real_health = await (await proxy.client.get("/v1/health")).json()
    real_aliases = await (await proxy.client.get("/v1/aliases")).json()
    real_provider_keys = {frozenset(view) for view in real_health["providers"].values()}
    real_entry_keys = {frozenset(entry) for entry in real_aliases["aliases"][0]["entries"]}
    assert len(real_provider_keys) == 1

    liveness, detail, alias = json_blocks(readme())[:3]
    assert set(liveness) == set(await (await proxy.client.get("/health")).json())
    assert set(detail) == set(real_health)
    assert {frozenset(view) for view in detail["providers"].values()} == real_provider_keys
    assert set(alias) <= set(real_aliases["aliases"][0])
    assert {frozenset(entry) for entry in alias["entries"]} == real_entry_keys
    assert {entry["reason"] for entry in alias["entries"]} <= {None, "unhealthy", "unconfigured"}

    documented = set(re.findall(r"^\| `([a-z_]+)` \|", readme(), flags=re.MULTILINE))
    (provider_keys,) = real_provider_keys
    assert provider_keys - {"kind", "configured", "max_concurrent"} <= documented


# `INFO manaproxy.request: ...`: a log line as the docs show it, level then logger name.
_DOCUMENTED_LOGGER_RE = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (manaproxy(?:\.[a-z_]+)*):")


def _pinned_loggers() -> set[str]:
    """Logger names the code creates as literals: `logging.getLogger("manaproxy.health")`. A `__name__`
    logger is not pinned: it would change name with its module."""
    names = set()
    for path in (ROOT / "manaproxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def test_every_logger_the_docs_show_is_one_the_code_pins():
    """`journalctl -u manaproxy | grep manaproxy.health:` written from the docs must match what is logged."""
    documented: dict[str, set[str]] = {}
    for path in [ROOT / "README.md", README, *sorted((ROOT / "docs").glob("*.md"))]:
        for name in _DOCUMENTED_LOGGER_RE.findall(path.read_text()):
            documented.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert {"manaproxy", "manaproxy.request", "manaproxy.health"} <= documented.keys()

    missing = {name: sorted(where) for name, where in documented.items() if name not in _pinned_loggers()}
    assert not missing, f"documented logger names no module pins with getLogger('...'): {missing}"
