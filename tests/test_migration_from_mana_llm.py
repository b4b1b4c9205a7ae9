"""Moving from mana-llm (issue 17): its `aliases.yaml` verbatim and its environment (variables, `.env`,
`--env-file`) with nothing else, served by real `manaproxy serve` processes in front of fake Ollama and Groq on
loopback; and the behaviours mana-llm's own test suite guarded (tests/test_router_fallback.py there).

One process answers most checks in turn (processes are slow to start); the order matters only where a check
leaves a failure on a model, noted where it does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote

import aiohttp
import pytest

from manaproxy.config import BUILTIN_PROVIDERS

from .fakes import FakeUpstream, chat_completion, closed_port_url, json_reply, status_reply
from .helpers import MANA_LLM_ALIASES, MANA_LLM_ALIASES_FLOW, parse_logfmt
from .processes import ROOT, ServeProcess

GROQ_KEY = "test-key-groq-from-env"
DOTENV_GROQ_KEY = "test-key-groq-from-dotenv"
ENVFILE_GROQ_KEY = "test-key-groq-from-envfile"
# What a migrating operator's shell must not leak into these processes: every variable manaproxy reads.
_OURS = {name for names in BUILTIN_PROVIDERS.values() for name in names} | {
    "PORT",
    "LOG_LEVEL",
    "MANAPROXY_API_KEYS",
    "CORS_ORIGINS",
    "NOTIFY_SOCKET",
}
MANA_LLM_ALIAS_NAMES = ["mana/fast-text", "mana/long-form", "mana/structured", "mana/reasoning", "mana/vision"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _OURS}
    return {**env, "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1", **extra}


def root_url(upstream: FakeUpstream) -> str:
    """OLLAMA_URL as mana-llm takes it: the server's root, `/v1` appended by manaproxy."""
    return upstream.base_url.removesuffix("/v1")


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeUpstream, FakeUpstream]]:
    ollama = await FakeUpstream("ollama").start()
    groq = await FakeUpstream("groq").start()
    ollama.default = json_reply(chat_completion("whatever-ollama-says"))
    groq.default = json_reply(chat_completion("whatever-groq-says"))
    yield ollama, groq
    await ollama.close()
    await groq.close()


@pytest.fixture
async def processes() -> AsyncIterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for process in started:
        await process.stop()


async def chat(
    session: aiohttp.ClientSession, process: ServeProcess, model: str | None
) -> tuple[int, dict[str, str], dict]:
    body: dict = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    async with session.post(process.url + "/v1/chat/completions", json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def request_line(process: ServeProcess, request_id: str) -> dict[str, str]:
    line = await process.wait_line(lambda text: f"request_id={request_id}" in text)
    return parse_logfmt(line.split("manaproxy.request: ", 1)[1])


async def test_mana_llm_file_and_dotenv_serve_as_mana_llm_did(tmp_path, fakes, processes):
    """mana-llm's file (block lists) and a `.env` beside it: the default alias from Ollama, fallbacks to Groq with
    Groq's key (the environment's, over the file's), OpenRouter unconfigured, bare names from Ollama."""
    ollama, groq = fakes
    (tmp_path / "aliases.yaml").write_text(MANA_LLM_ALIASES)
    (tmp_path / ".env").write_text(
        "# mana-llm's .env\n"
        f"OLLAMA_URL={root_url(ollama)}\n"
        f"export GROQ_BASE_URL='{groq.base_url}'\n"
        f'GROQ_API_KEY="{DOTENV_GROQ_KEY}"   # the environment has its own: it wins\n'
    )
    env = clean_env(GROQ_API_KEY=GROQ_KEY)
    process = ServeProcess(tmp_path / "aliases.yaml", env, cwd=tmp_path)
    processes.append(process)
    await process.start()

    async with aiohttp.ClientSession() as session:
        # No `model`: the default alias, from its first entry; the later ones are never called.
        status, headers, body = await chat(session, process, None)
        assert status == 200, body
        assert body["model"] == "ollama/qwen2.5:7b"
        assert headers["X-Mana-LLM-Resolved"] == "ollama/qwen2.5:7b"
        assert ollama.requests[-1].json["model"] == "qwen2.5:7b"
        assert groq.calls == 0

        # A bare model name is Ollama's.
        status, headers, body = await chat(session, process, "gemma3:4b")
        assert (status, body["model"], ollama.requests[-1].json["model"]) == (200, "ollama/gemma3:4b", "gemma3:4b")

        # 5xx and 429 fall through to the next entry, which gets its own key (one failure on each Ollama model).
        for alias, failure in (("mana/long-form", 503), ("mana/structured", 429)):
            ollama.queue(status_reply(failure))
            status, headers, body = await chat(session, process, alias)
            assert status == 200, body
            assert unquote(headers["X-Mana-LLM-Resolved"]) == body["model"]
            assert body["model"] == {"mana/long-form": "groq/llama-3.3-70b-versatile"}.get(
                alias, "groq/llama-3.1-8b-instant"
            )
            assert groq.requests[-1].headers["Authorization"] == f"Bearer {GROQ_KEY}"
            assert ollama.requests[-1].json["model"] != groq.requests[-1].json["model"]
        groq_calls = groq.calls

        # Other 4xx do not: the request itself is wrong, and the caller gets Ollama's answer.
        for failure in (400, 422):
            ollama.queue(status_reply(failure, "bad request"))
            status, _, body = await chat(session, process, "mana/long-form")
            assert status == failure
            assert "bad request" in body["error"]["message"]
        assert groq.calls == groq_calls

        # A direct provider/model has no fallback (Ollama is healthy and never asked).
        ollama_calls = ollama.calls
        groq.queue(status_reply(503))
        status, _, body = await chat(session, process, "groq/llama-3.3-70b-versatile")
        assert status == 503
        assert ollama.calls == ollama_calls

        # An unconfigured entry (OpenRouter, no key) is skipped, and listed among the attempts.
        groq.queue(status_reply(503))
        status, headers, body = await chat(session, process, "mana/reasoning")
        assert status == 503
        attempts = headers["X-Mana-LLM-Attempts"].split(", ")
        assert attempts[0] == "openrouter/anthropic/claude-3.5-sonnet=unconfigured"
        assert attempts[1].startswith("groq/llama-3.3-70b-versatile=")
        assert body["error"]["message"] == "groq/llama-3.3-70b-versatile: upstream error"  # the one tried, its error

        async with session.get(process.url + "/v1/aliases") as resp:
            aliases = await resp.json()
        async with session.get(process.url + "/v1/health") as resp:
            health = await resp.json()
        async with session.get(process.url + "/health") as resp:
            liveness = await resp.json()

    # `/v1/aliases` lists each alias with its chain and description, as mana-llm's did.
    assert aliases["default"] == "mana/fast-text"
    listed = {alias["name"]: alias for alias in aliases["aliases"]}
    assert sorted(listed) == sorted(MANA_LLM_ALIAS_NAMES)
    assert listed["mana/vision"]["description"] == "Multimodal (image + text)"
    assert listed["mana/vision"]["chain"] == [
        "ollama/llava:7b",
        "google/gemini-2.0-flash-exp",
        "openrouter/openai/gpt-4o",
    ]
    reasons = {entry["target"]: entry["reason"] for entry in listed["mana/vision"]["entries"]}
    assert reasons["openrouter/openai/gpt-4o"] == reasons["google/gemini-2.0-flash-exp"] == "unconfigured"
    # OpenRouter has no key: unconfigured; Groq's key came from the environment (over `.env`'s).
    assert health["providers"]["openrouter"]["status"] == "unconfigured"
    assert health["providers"]["groq"]["configured"] is True
    assert "together" not in health["providers"]  # no chain names it and TOGETHER_API_KEY is unset
    # mana-llm's `/health` shape: its uptime checks read `status`, some dashboards `service`.
    assert set(liveness) >= {"status", "service", "version", "providers"}
    assert liveness["service"] == "mana-llm"
    assert "openrouter" not in liveness["providers"]
    assert DOTENV_GROQ_KEY not in process.stderr
    assert GROQ_KEY not in process.stderr
    assert any(
        "read 3 variables from .env (already in the environment, kept: GROQ_API_KEY)" in line for line in process.lines
    )


async def test_env_file_and_a_refused_ollama_fall_back_to_groq(tmp_path, fakes, processes):
    """`--env-file PATH` instead of `./.env`, mana-llm's file with flow lists: Ollama refuses connections, so the
    default alias is served by Groq with the env file's key."""
    _, groq = fakes
    (tmp_path / "aliases.yaml").write_text(MANA_LLM_ALIASES_FLOW)
    (tmp_path / ".env").write_text("GROQ_API_KEY=test-key-not-this-file\n")  # --env-file replaces it
    env_file = tmp_path / "mana-llm.env"
    env_file.write_text(
        f"OLLAMA_URL={closed_port_url().removesuffix('/v1')}\nGROQ_BASE_URL={groq.base_url}\n"
        f"GROQ_API_KEY={ENVFILE_GROQ_KEY}\n"
    )
    process = ServeProcess(tmp_path / "aliases.yaml", clean_env(), cwd=tmp_path, args=["--env-file", str(env_file)])
    processes.append(process)
    await process.start()

    async with aiohttp.ClientSession() as session:
        status, headers, body = await chat(session, process, "mana/fast-text")
    assert status == 200, body
    assert body["model"] == "groq/llama-3.1-8b-instant"
    assert groq.requests[-1].json["model"] == "llama-3.1-8b-instant"
    assert groq.requests[-1].headers["Authorization"] == f"Bearer {ENVFILE_GROQ_KEY}"
    logged = await request_line(process, headers["X-Request-ID"])
    # Refused at once (or already known refused by the first probe): never a wait on Ollama.
    assert logged["attempts"] in ("ollama/qwen2.5:7b:connect", "ollama/qwen2.5:7b:unhealthy")
    assert ENVFILE_GROQ_KEY not in process.stderr


# -- the command: `.env` is read, malformed lines are named, values never shown --------------------------------


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "manaproxy", *args],
        env={**clean_env(**env), "PYTHONPATH": str(ROOT)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


async def test_check_reads_dotenv_and_says_how_each_provider_is_made(tmp_path):
    (tmp_path / "aliases.yaml").write_text(MANA_LLM_ALIASES)
    (tmp_path / ".env").write_text(
        "OPENROUTER_API_KEY=test-key-or-dotenv-1\nGROQ_API_KEY=test-key-groq-dotenv-2\nOLLAMA_URL=http://gpu.internal:11434\n"
    )
    result = await asyncio.to_thread(run, ["check"], tmp_path, GROQ_API_KEY="test-key-groq-env-3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("manaproxy: config ok: ./aliases.yaml: 4 providers (3 configured), 5 aliases")
    assert lines[1:] == [
        "  env file: read 3 variables from .env (already in the environment, kept: GROQ_API_KEY)",
        "  provider ollama: built in, configured",
        "  provider openrouter: built in, configured",
        "  provider groq: built in, configured",
        "  provider google: built in, unconfigured (GOOGLE_API_KEY is not set)",
    ]
    for secret in ("test-key-or-dotenv-1", "test-key-groq-dotenv-2", "test-key-groq-env-3", "gpu.internal"):
        assert secret not in result.stdout + result.stderr


async def test_a_malformed_env_file_is_refused_naming_its_line(tmp_path):
    (tmp_path / "aliases.yaml").write_text(MANA_LLM_ALIASES)
    (tmp_path / ".env").write_text("OLLAMA_URL=http://localhost:11434\ngsk_test-key-pasted-alone\n")
    (tmp_path / "other.env").write_text("A=1\nB='test-key-unclosed\n")
    check, serve, other = await asyncio.gather(
        asyncio.to_thread(run, ["check"], tmp_path),
        asyncio.to_thread(run, ["serve", "--port", "9"], tmp_path),
        asyncio.to_thread(run, ["check", "--env-file", "other.env"], tmp_path),
    )
    assert check.returncode == 1
    assert "config invalid: .env: line 2: expected KEY=VALUE" in check.stderr
    assert serve.returncode == 2  # as an invalid config: systemd does not restart-loop on it
    assert "invalid env file, not starting: .env: line 2:" in serve.stderr
    assert other.returncode == 1
    assert "other.env: line 2: B: no closing '" in other.stderr
    for result in (check, serve, other):
        assert "test-key" not in result.stdout + result.stderr

    missing = await asyncio.to_thread(run, ["check", "--env-file", "nowhere.env"], tmp_path)
    assert missing.returncode == 1
    assert "nowhere.env: cannot read" in missing.stderr
