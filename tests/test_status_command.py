"""`manaproxy status` as a person on SSH and a monitoring check run it: the real command in a subprocess, against a
real manaproxy on loopback — a line per alias, provider and unwell model, the last reload, the latest failures;
`--json`; `--watch`; exit 0 healthy, 1 degraded, 2 unhealthy or unreachable."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from .fakes import chat_answer, closed_port_url, status_reply
from .helpers import CHAT, build_config, chat
from .processes import ROOT

KEY = "status-cli-key-5d2e8b"


async def status(*args: str, **env: str) -> tuple[int, str]:
    """Run `manaproxy status ARGS`; (exit status, stdout). Its stderr must stay empty."""
    base = {k: v for k, v in os.environ.items() if k not in ("MANAPROXY_API_KEYS", "PORT", "NO_COLOR")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "manaproxy",
        "status",
        *args,
        cwd=ROOT,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert err == b"", err.decode()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def line_of(output: str, kind: str, name: str) -> list[str]:
    """The words of the line `kind name ...`."""
    for line in output.splitlines():
        words = line.split()
        if words[:2] == [kind, name]:
            return words
    raise AssertionError(f"no line {kind} {name} in:\n{output}")


async def incident_proxy(make_upstream: Any, make_proxy: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
    """local (fine), gpu (to be killed), groq (to be rate-limited), openrouter (no key). Returns (gpu, groq, proxy)."""
    local, gpu, groq = [await make_upstream(name) for name in ("local", "gpu", "groq")]
    for upstream in (local, gpu, groq):
        upstream.default = chat_answer("m")
    providers = {"local": local, "gpu": gpu, "groq": groq, "openrouter": {"base_url": local, "api_key": "${NO_KEY}"}}
    aliases = {
        "mana/fast-text": ["gpu/llama-70b", "local/qwen2.5:7b"],
        "mana/long-form": ["groq/llama-3.3-70b", "openrouter/claude", "local/qwen2.5:7b"],
    }
    config = build_config(providers, aliases, health={"failure_threshold": 1})
    return gpu, groq, await make_proxy(config, **kwargs)


async def test_healthy_exits_0_with_a_line_per_alias_and_provider(make_upstream, make_proxy):
    _, _, proxy = await incident_proxy(make_upstream, make_proxy)
    (code, text), (json_code, document) = await asyncio.gather(
        status("--url", proxy.root_url), status("--url", proxy.root_url, "--json")
    )
    assert code == json_code == 0
    head, *_ = text.splitlines()
    assert head.startswith(f"manaproxy {proxy.root_url}  healthy  version ")
    assert line_of(text, "alias", "mana/fast-text")[2:4] == ["healthy", "serving"]
    assert line_of(text, "alias", "mana/long-form")[2:] == [
        "healthy",
        "serving",
        "groq/llama-3.3-70b;",
        "skipped:",
        "openrouter/claude",
        "unconfigured",
    ]
    for provider in ("local", "gpu", "groq"):
        assert line_of(text, "provider", provider)[2:5] == ["healthy", "breaker", "closed"]
    assert line_of(text, "provider", "openrouter")[2] == "unconfigured"
    assert "\x1b[" not in text  # no colour when stdout is no terminal
    parsed = json.loads(document)
    assert (parsed["status"], parsed["reasons"], parsed["failures"]) == ("healthy", [], [])
    assert set(parsed["health"]["providers"]) == {"local", "gpu", "groq", "openrouter"}


async def test_an_incident_exits_1_and_shows_all_three(make_upstream, make_proxy, tmp_path: Path):
    gpu, groq, proxy = await incident_proxy(make_upstream, make_proxy)
    await gpu.close()  # one provider killed
    groq.queue(status_reply(429, "Rate limit reached", headers={"Retry-After": "30"}))  # another rate-limited
    for model, request_id in (("mana/fast-text", "req-gpu-down"), ("mana/long-form", "req-groq-429")):
        resp = await proxy.client.post(CHAT, json=chat(model), headers={"X-Request-ID": request_id})
        assert resp.status == 200
    assert not proxy.reload_to(tmp_path, "providers: [oops\n")  # a bad reload

    (code, text), (json_code, document) = await asyncio.gather(
        status("--url", proxy.root_url), status("--url", proxy.root_url, "--json")
    )
    assert code == json_code == 1
    assert text.splitlines()[0].startswith(f"manaproxy {proxy.root_url}  degraded  ")
    gpu_line = line_of(text, "provider", "gpu")
    assert gpu_line[2:5] == ["unhealthy", "breaker", "open"]
    assert "cannot connect" in " ".join(gpu_line)
    groq_line = line_of(text, "model", "groq/llama-3.3-70b")
    assert groq_line[2] == "rate_limited"
    assert "HTTP 429: Rate limit reached" in " ".join(groq_line)
    assert line_of(text, "provider", "groq")[2] == "healthy"  # only that model is kept out
    fast_text = " ".join(line_of(text, "alias", "mana/fast-text"))
    assert re.search(r"skipped: gpu/llama-70b unhealthy until \S+, next try \S+", fast_text), fast_text
    reload_words = next(line.split() for line in text.splitlines() if line.startswith("reload"))
    assert reload_words[2] == "rejected"
    assert "aliases.yaml: line 2:" in " ".join(reload_words)
    failures = [line for line in text.splitlines() if line.startswith("failure")]
    assert len(failures) == 2
    assert (
        "mana/long-form -> local/qwen2.5:7b after groq/llama-3.3-70b:http_429, openrouter/claude:unconfigured"
        in (failures[0])
    )
    assert failures[0].endswith("req-groq-429)")
    assert "2 failed or fell back in the last 5 minutes (2 kept)" in text

    parsed = json.loads(document)
    assert parsed["status"] == "degraded"
    assert parsed["reasons"] == [
        "provider gpu unhealthy",
        "model groq/llama-3.3-70b rate_limited",
        "alias mana/fast-text degraded",
        "alias mana/long-form degraded",
        "the last reload was rejected",
    ]
    assert [item["request_id"] for item in parsed["failures"]] == ["req-groq-429", "req-gpu-down"]


async def test_unhealthy_or_unreachable_exits_2(make_upstream, make_proxy):
    config = build_config({"dead": closed_port_url()}, {"mana/x": ["dead/m"]}, health={"failure_threshold": 1})
    proxy = await make_proxy(config)
    assert (await proxy.client.post(CHAT, json=chat("mana/x"))).status == 503
    (code, text), (gone, gone_text), (gone_json, document) = await asyncio.gather(
        status("--url", proxy.root_url),
        status("--url", closed_port_url().removesuffix("/v1")),
        status("--url", closed_port_url().removesuffix("/v1"), "--json"),
    )
    assert code == 2
    assert line_of(text, "alias", "mana/x")[2:5] == ["unhealthy", "serving", "nothing"]
    assert gone == gone_json == 2
    assert "unreachable" in gone_text
    assert json.loads(document)["status"] == "unreachable"


async def test_the_key_comes_from_the_environment_and_is_never_shown(make_upstream, make_proxy):
    _, _, proxy = await incident_proxy(make_upstream, make_proxy, api_keys=[KEY.encode()])
    (code, text), (default_env, _), (missing, refused) = await asyncio.gather(
        status("--url", proxy.root_url, "--key-env", "ONCALL_KEY", ONCALL_KEY=f"{KEY},another-key"),
        status("--url", proxy.root_url, "--json", MANAPROXY_API_KEYS=KEY),  # the default variable, as in manaproxy.env
        status("--url", proxy.root_url),
    )
    assert (code, default_env) == (0, 0)
    assert KEY not in text
    assert missing == 2
    assert "key was refused or is missing" in refused
    assert KEY not in refused


async def test_watch_redraws_until_interrupted_and_exits_with_the_last_verdict(make_upstream, make_proxy):
    gpu, _, proxy = await incident_proxy(make_upstream, make_proxy)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "manaproxy",
        "status",
        "--url",
        proxy.root_url,
        "--watch",
        "--json",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
    assert first["status"] == "healthy"
    await gpu.close()
    assert (await proxy.client.post(CHAT, json=chat("mana/fast-text"))).status == 200  # falls back; gpu opens
    second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 5))  # within one interval, without asking
    assert second["status"] == "degraded"
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 5) == 1
