"""The real `manaproxy` command in a subprocess: `check` (like `nginx -t`), `serve` refusing a bad config (exit 2,
one line, journald-ready), help."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import ROOT

SHIPPED = ROOT / "aliases.yaml"
PROVIDER_KEYS = ("GROQ_API_KEY", "OPENROUTER_API_KEY", "TOGETHER_API_KEY", "GOOGLE_API_KEY", "OLLAMA_URL")

VALID = """
providers:
  local: {base_url: "http://127.0.0.1:9/v1"}
  cloud: {base_url: "http://127.0.0.1:9/v1", api_key: "${CLOUD_KEY}"}
aliases:
  mana/x: {chain: [local/m1, cloud/m2]}
default: mana/x
"""


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in PROVIDER_KEYS and k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "manaproxy", *args],
        env={**base, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_many(
    commands: list[list[str]], *, env: dict[str, str] | None = None, timeout: float = 15
) -> list[subprocess.CompletedProcess[str]]:
    """Run several invocations at once: each pays ~0.25 s of imports, so the table stays fast."""
    base = {k: v for k, v in os.environ.items() if k not in PROVIDER_KEYS and k != "NOTIFY_SOCKET"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "manaproxy", *args],
            env={**base, **(env or {})},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        results.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return results


def write(tmp_path: Path, text: str, name: str = "aliases.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- check: valid ---------------------------------------------------------------------------------


def test_check_valid_config_prints_one_line_summary(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = run("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The summary, then one line per provider: declared or built in, configured or not (never a key).
    assert lines[1:] == [
        "  provider local: declared, configured",
        "  provider cloud: declared, unconfigured (its api_key is empty)",
    ]
    assert lines[0].startswith("manaproxy: config ok: ")
    assert str(path) in lines[0]
    assert "2 providers (1 configured)" in lines[0]
    assert "1 aliases" in lines[0]
    assert "mana/x" in lines[0]
    assert "cloud" in lines[0]  # named as unconfigured: its key is not in the environment
    assert "Traceback" not in result.stderr


def test_check_counts_provider_whose_key_is_in_env(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    result = run("check", "--config", str(path), env={"CLOUD_KEY": "test-key-cli-1"})
    assert result.returncode == 0, result.stderr
    assert "2 providers (2 configured)" in result.stdout
    assert "test-key-cli-1" not in result.stdout + result.stderr


def test_check_shipped_config() -> None:
    result = run("check", "--config", str(SHIPPED), env={"GROQ_API_KEY": "test-key-groq"})
    assert result.returncode == 0, result.stderr
    assert "4 providers (2 configured), 5 aliases, default mana/fast-text" in result.stdout
    assert "  provider groq: built in, configured" in result.stdout.splitlines()
    assert "test-key-groq" not in result.stdout + result.stderr


def test_check_defaults_to_aliases_yaml_in_cwd(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    result = run("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "aliases.yaml" in result.stdout


# -- check: invalid -------------------------------------------------------------------------------


INVALID = [
    # (case, config text, what the one-line message must name); test_config.py holds the full table
    ("undeclared-provider", VALID.replace("cloud/m2", "ghost/m2"), ["aliases.mana/x.chain[1]", "ghost"]),
    ("unknown-top-level-key", VALID + "colour: red\n", ["unknown key 'colour'"]),
    (
        "unknown-provider-key",
        VALID.replace('local: {base_url: "http://127.0.0.1:9/v1"}', 'local: {base_url: "http://h", timeout: 3}'),
        ["providers.local", "unknown key 'timeout'"],
    ),
    ("yaml-syntax", "providers:\n  a: [\n", ["line 3"]),
    ("binary", "\x00\x01\x02\ufffe", []),
]


def test_check_invalid_config_names_the_place(tmp_path: Path) -> None:
    paths = [write(tmp_path, text, f"{case}.yaml") for case, text, _ in INVALID]
    results = run_many([["check", "--config", str(path)] for path in paths])
    for (case, _, names), path, result in zip(INVALID, paths, results, strict=True):
        message = result.stderr.strip()
        assert result.returncode == 1, case
        assert result.stdout == "", case
        assert message.startswith("manaproxy: config invalid: "), (case, message)
        assert "Traceback" not in message, (case, message)
        assert len(message.splitlines()) == 1, (case, message)
        assert str(path) in message, (case, message)
        for name in names:
            assert name in message, (case, message)


def test_check_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = run("check", "--config", str(path))
    assert result.returncode != 0
    assert str(path) in result.stderr
    assert "cannot read" in result.stderr
    assert "No such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_unparseable_base_url_gives_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("http://127.0.0.1:9/v1", "http://[::1/v1", 1))
    result = run("check", "--config", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "providers.local.base_url" in result.stderr


# -- serve with a bad config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [pytest.param(VALID.replace("cloud/m2", "ghost/m2"), id="invalid"), pytest.param(None, id="missing")]
)
def test_serve_with_bad_config_exits_2_at_once(tmp_path: Path, text: str | None) -> None:
    """Exit status 2 is what the unit's RestartPreventExitStatus= expects: no restart loop on a bad file."""
    path = write(tmp_path, text) if text is not None else tmp_path / "missing.yaml"
    started = time.monotonic()
    result = run("serve", "--config", str(path), "--host", "127.0.0.1", "--port", "0", timeout=10)
    assert time.monotonic() - started < 5
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line: no traceback, never "listening"
    assert "ERROR manaproxy: invalid config, not starting: " in line
    assert str(path) in line
    if text is not None:
        assert "aliases.mana/x.chain[1]" in line


def test_under_journald_lines_carry_their_syslog_priority_and_no_timestamp(tmp_path: Path) -> None:
    """systemd sets $JOURNAL_STREAM to the device:inode of the stream it gave as stderr."""
    bad = write(tmp_path, "providers: {}\n")
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        stat = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}", "LOG_LEVEL": "info"}
        code = subprocess.call(
            [sys.executable, "-m", "manaproxy", "serve", "--config", str(bad)],
            stderr=stderr,
            cwd=ROOT,
            env=env,
            timeout=20,
        )
    assert code == 2
    (line,) = log.read_text().splitlines()
    assert line.startswith("<3>ERROR manaproxy: invalid config, not starting: ")


# -- help -----------------------------------------------------------------------------------------


def test_help_version_and_usage() -> None:
    top, serve, check, version, bare = run_many(
        [["--help"], ["serve", "--help"], ["check", "--help"], ["--version"], []]
    )
    assert top.returncode == 0
    assert "serve" in top.stdout
    assert "check" in top.stdout
    assert serve.returncode == 0
    for option in ("--config", "--host", "--port"):
        assert option in serve.stdout
    assert check.returncode == 0
    assert "--config" in check.stdout
    assert version.returncode == 0
    assert version.stdout.startswith("manaproxy ")
    assert bare.returncode == 2  # argparse usage error: a command is required
    assert "usage: manaproxy" in bare.stderr


# -- check: clients (issue 19) ------------------------------------------------------------------------------


def test_check_names_the_clients_and_refuses_a_key_in_both_places(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "clients:\n  bot: {key: '${BOT_KEY}'}\n  idle: {key: '${UNSET_KEY}'}\n")
    env = {"BOT_KEY": "sk-bot-0123456789", "MANAPROXY_API_KEYS": "chat:sk-chat-0123456789,sk-bare-0123456789"}

    ok = run("check", "--config", str(path), env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0].endswith("; clients chat, key-2, bot, idle")
    assert "clients.idle has no key" in ok.stderr

    clash = run("check", "--config", str(path), env={**env, "MANAPROXY_API_KEYS": "sk-bot-0123456789"})
    assert clash.returncode == 1
    assert "clients.bot: a key of client 'bot' is also MANAPROXY_API_KEYS[1]'s" in clash.stderr
    assert "sk-bot" not in clash.stdout + clash.stderr
