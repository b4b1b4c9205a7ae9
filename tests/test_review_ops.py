"""Review of operations, metrics and the google kind: what the review found, as end-to-end tests.

Tests marked `xfail(strict=True)` pin a bug the review found (the reason says where and why); they turn
into failures ("XPASS strict") once the bug is fixed, so the marker must then go. The other tests pin
risky behaviour that was verified to work and that no other test covered.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from manaproxy.health.probe import probe_one
from manaproxy.providers.google import GoogleProvider
from manaproxy.systemd import notify

from .fakes import (
    GEMINI_KEY_INVALID_INFO,
    GEMINI_KEY_NOT_VALID,
    GEMINI_MODEL,
    FakeGemini,
    FakeUpstream,
    KeyRejectingGemini,
    after,
    chat_completion,
    gated_stream,
    gemini_error_reply,
    json_reply,
    status_reply,
    wait_for,
)
from .helpers import FAST_PROBES, Proxy, ask, build_config, chat, promtool
from .processes import next_datagram, read_datagrams

KEY = "test-key-1"
MODEL = GEMINI_MODEL


def reload_to(proxy: Any, tmp_path: Path, text: str) -> None:
    assert proxy.reload_to(tmp_path, text)


# -- health: half-open trial accounting ------------------------------------------------------------------


async def test_a_trial_stream_outliving_a_reopened_breaker_does_not_block_the_next_trial(make_upstream, make_proxy):
    a = await make_upstream("a")
    b = await make_upstream("b")
    a.default = status_reply(503)
    b.default = json_reply(chat_completion("m2"))
    health_settings = {"failure_threshold": 1, "backoff_seconds": 0.2}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health_settings))
    health = proxy.gateway.health

    assert await ask(proxy) == "b/m2"  # a fails once: open
    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)

    gate = asyncio.Event()
    a.queue(gated_stream(gate))
    resp = await proxy.client.post("/v1/chat/completions", json=chat(stream=True))
    assert resp.headers["X-Mana-LLM-Resolved"] == "a/m1"  # the trial: its first event closes the breaker
    await resp.content.readuntil(b"\n\n")
    assert health.breaker("a") == "closed"

    assert await ask(proxy) == "b/m2"  # a fails again while the trial stream still runs: open again
    await wait_for(lambda: health.breaker("a") == "half_open", timeout=2)
    a.default = json_reply(chat_completion("m1"))
    try:
        assert await ask(proxy) == "a/m1"  # the window is over: this request is the new trial
    finally:
        gate.set()
        await resp.read()


# -- health across a reload ------------------------------------------------------------------------------


async def test_a_request_to_the_old_upstream_cannot_open_the_breaker_of_the_new_one(
    make_upstream, make_proxy, tmp_path
):
    old = await make_upstream("old")
    new = await make_upstream("new")
    b = await make_upstream("b")
    gate = asyncio.Event()
    old.default = after(gate, status_reply(503))
    new.default = json_reply(chat_completion("m1"))
    b.default = json_reply(chat_completion("m2"))
    settings = {"failure_threshold": 1, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": old, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=settings))

    in_flight = asyncio.create_task(ask(proxy))
    await wait_for(lambda: old.calls == 1)
    # The operator's fix for a failing provider: point it elsewhere and reload.
    reload_to(proxy, tmp_path, build_config({"a": new, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=settings))
    gate.set()
    assert await in_flight == "b/m2"  # the old upstream failed; the request fell back on its old chain

    assert await ask(proxy) == "a/m1"  # the new upstream has a clean slate and answers


async def test_a_removed_provider_re_added_elsewhere_starts_with_a_clean_slate(make_upstream, make_proxy, tmp_path):
    old = await make_upstream("old")
    new = await make_upstream("new")
    b = await make_upstream("b")
    gate = asyncio.Event()
    old.default = after(gate, status_reply(503))
    new.default = json_reply(chat_completion("m1"))
    b.default = json_reply(chat_completion("m2"))
    settings = {"failure_threshold": 1, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": old, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=settings))

    in_flight = asyncio.create_task(ask(proxy))
    await wait_for(lambda: old.calls == 1)
    reload_to(proxy, tmp_path, build_config({"b": b}, {"mana/x": ["b/m2"]}, health=settings))
    gate.set()
    assert await in_flight == "b/m2"

    reload_to(proxy, tmp_path, build_config({"a": new, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=settings))
    assert await ask(proxy) == "a/m1"


# -- the google kind -------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def google_proxy(make_proxy: Any, gemini: FakeGemini) -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """A proxy with `mana/g` = [google/MODEL on the fake Gemini, then `backup/m2` if given]."""
    proxies: list[Proxy] = []

    async def make(health: dict[str, Any] | None = None, backup: FakeUpstream | None = None) -> Proxy:
        providers: dict[str, Any] = {"google": {"kind": "google", "base_url": gemini.base_url, "api_key": KEY}}
        chain = [f"google/{MODEL}"]
        if backup is not None:
            providers["backup"] = backup
            chain.append("backup/m2")
        proxy = await make_proxy(build_config(providers, {"mana/g": chain}, health=health))
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        for provider in proxy.gateway.runtime.providers.values():
            if isinstance(provider, GoogleProvider):
                await provider.aclose()


async def test_a_rejected_google_api_key_falls_back_and_counts_against_google(google_proxy, gemini, make_upstream):
    backup = await make_upstream("backup")
    backup.default = json_reply(chat_completion("m2"))
    proxy = await google_proxy(health={"failure_threshold": 1}, backup=backup)
    gemini.default = gemini_error_reply(400, GEMINI_KEY_NOT_VALID, "INVALID_ARGUMENT", details=GEMINI_KEY_INVALID_INFO)

    assert await ask(proxy, chat("mana/g")) == "backup/m2"
    assert proxy.gateway.health.breaker("google") == "open"


async def test_a_probe_rejected_for_its_api_key_marks_google_unhealthy(make_proxy):
    fake = await KeyRejectingGemini().start()
    spec = {"kind": "google", "base_url": fake.base_url, "api_key": KEY}
    proxy = await make_proxy(
        build_config({"google": spec}, {"mana/g": [f"google/{MODEL}"]}, health={"failure_threshold": 1})
    )
    provider = proxy.gateway.runtime.providers["google"]
    try:
        await probe_one(proxy.gateway, provider, 1.0)
        view = (await (await proxy.client.get("/v1/health")).json())["providers"]["google"]
        assert view["status"] == "unhealthy", view  # what an operator reads in an outage
        assert KEY not in str(view)
    finally:
        assert isinstance(provider, GoogleProvider)
        await provider.aclose()
        await fake.close()


REFUSED_MODELS = [f"{MODEL}?alt=json", "../../v1/files", f"{MODEL}/.."]  # the SDK raises "invalid model parameter"


async def test_a_client_cannot_open_googles_breaker_with_a_model_name_google_refuses(google_proxy, gemini):
    proxy = await google_proxy(health={"failure_threshold": 2})
    for model in REFUSED_MODELS[:2]:
        resp = await proxy.client.post("/v1/chat/completions", json={"model": f"google/{model}", "messages": USER})
        await resp.read()
    assert gemini.requests == []  # nothing reached Google: it cannot have failed
    assert proxy.gateway.health.breaker("google") == "closed"
    assert await ask(proxy, chat("mana/g")) == f"google/{MODEL}"


@pytest.mark.parametrize("model", REFUSED_MODELS)
async def test_a_model_name_google_refuses_is_a_400(google_proxy, gemini, model):
    proxy = await google_proxy()
    resp = await proxy.client.post("/v1/chat/completions", json={"model": f"google/{model}", "messages": USER})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == "model"
    assert gemini.requests == []


async def test_an_unparseable_image_url_is_a_400(google_proxy, gemini):
    proxy = await google_proxy()
    image = {"type": "image_url", "image_url": {"url": "http://[::1/cat.png"}}
    resp = await proxy.client.post(
        "/v1/chat/completions", json={"model": "mana/g", "messages": [{"role": "user", "content": [image]}]}
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["param"] == "messages[0].content[0].image_url.url"
    assert gemini.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_chat_request_with_a_query_string_reaches_google(google_proxy, gemini, stream):
    proxy = await google_proxy()
    resp = await proxy.client.post(
        "/v1/chat/completions?api-version=2024-10-21", json={"model": "mana/g", "messages": USER, "stream": stream}
    )
    assert resp.status == 200, await resp.text()
    await resp.read()
    assert len(gemini.requests) == 1


# -- alert rules -----------------------------------------------------------------------------------------

ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"


def promtool_test_rules(tmp_path: Path, cases: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": cases}))
    return subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=20)


def series_lines(text: str, name: str) -> list[str]:
    """`name{labels}` of every sample of `name` in a scrape, with the job/instance Prometheus adds."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = line[len(name) + 1 : line.index("}")]
            out.append(f'{name}{{job="mana-llm", instance="a:3025", {labels}}}')
    return out


async def test_a_provider_without_a_key_does_not_fire_the_fallback_ratio_alert(make_upstream, make_proxy, tmp_path):
    """Leaving a provider's key unset is a normal deployment (the shipped chains name five providers):
    skipping it on every request is no sign that first choices are failing."""
    b = await make_upstream("b")
    b.default = json_reply(chat_completion("m2"))
    proxy = await make_proxy(build_config({"g": {"base_url": b, "api_key": ""}, "b": b}, {"mana/x": ["g/m1", "b/m2"]}))
    for _ in range(3):
        assert await ask(proxy) == "b/m2"
    text = await (await proxy.client.get("/metrics")).text()
    (fallback,) = series_lines(text, "mana_llm_fallback_total")
    (requests,) = series_lines(text, "mana_llm_llm_requests_total")
    assert 'reason="unconfigured"' in fallback
    assert (
        proxy.registry.get_sample_value(
            "mana_llm_fallback_total", {"from_model": "g/m1", "to_model": "b/m2", "reason": "unconfigured"}
        )
        == proxy.registry.get_sample_value(
            "mana_llm_llm_requests_total", {"provider": "b", "model": "m2", "streaming": "false"}
        )
        == 3
    )

    # The same traffic, one request per second for 40 minutes: every request skips g.
    series = [{"series": fallback, "values": "0+60x40"}, {"series": requests, "values": "0+60x40"}]
    case = {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [{"eval_time": "40m", "alertname": "ManaLLMFallbackRatioHigh", "exp_alerts": []}],
    }
    result = promtool_test_rules(tmp_path, [case])
    assert result.returncode == 0, result.stdout + result.stderr


# -- the process: signals while draining -----------------------------------------------------------------


async def test_sighup_and_a_second_sigterm_while_draining_change_nothing(make_upstream, serve, tmp_path):
    up = await make_upstream("up")
    gate = asyncio.Event()
    up.default = gated_stream(gate)
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.setblocking(False)
    try:
        proxy = await serve(build_config({"up": up}, {"mana/x": ["up/m1"]}), wait=False, NOTIFY_SOCKET=str(notify_path))
        assert (await next_datagram(sock)).startswith("READY=1\n")
        async with aiohttp.ClientSession() as session:
            resp = await session.post(proxy.url + "/v1/chat/completions", json=chat(stream=True))
            await resp.content.readuntil(b"\n\n")

            proxy.signal(signal.SIGTERM)
            assert await next_datagram(sock) == "STOPPING=1"
            proxy.config_path.write_text(build_config({"up": up}, {"mana/x": ["up/m1"], "mana/y": ["up/m2"]}))
            proxy.signal(signal.SIGHUP)
            await proxy.wait_line(lambda line: "SIGHUP ignored: stopping" in line)
            proxy.signal(signal.SIGTERM)
            # Let the second SIGTERM land before the stream can end; a process that took it as "quit now"
            # would exit here, and the stream below would be cut.
            await asyncio.sleep(0.05)
            assert proxy.proc is not None
            assert proxy.proc.returncode is None

            gate.set()
            rest = await resp.content.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        assert await proxy.wait_exit() == 0
        assert read_datagrams(sock) == []  # no RELOADING=1/READY=1 after STOPPING=1
        assert not proxy.lines_with("reloaded ")
    finally:
        sock.close()


def test_sd_notify_reaches_an_abstract_socket_and_survives_a_missing_one(monkeypatch, caplog):
    """systemd may hand out `@name` (abstract namespace); a socket that is gone only logs a warning."""
    name = f"manaproxy-review-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1\nSTATUS=ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # nobody listens any more
    assert not notify("STOPPING=1")
    assert "sd_notify STOPPING failed" in caplog.text
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify("READY=1")


# -- probes: shutdown and reloads ------------------------------------------------------------------------

PROBING = FAST_PROBES


def probe_tasks() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("manaproxy-probe")]


async def test_probes_stop_when_the_app_is_cleaned_up(make_upstream, make_proxy):
    slow = await make_upstream("slow")
    fast = await make_upstream("fast")
    slow.models_delay = 5.0
    proxy = await make_proxy(build_config({"slow": slow, "fast": fast}, health=PROBING), probes=True)
    await wait_for(lambda: fast.models_calls >= 2 and slow.models_calls == 1)
    assert probe_tasks()

    await proxy.client.close()  # the app's cleanup: the probe loop and the hanging probe are cancelled
    assert probe_tasks() == []
    calls = fast.models_calls
    await asyncio.sleep(0.2)  # four probe intervals
    assert fast.models_calls == calls


@pytest.mark.parametrize("change", ["removed", "repointed"])
async def test_a_probe_answered_after_a_reload_changed_its_provider_is_not_recorded(
    make_upstream, make_proxy, tmp_path, caplog, change
):
    slow = await make_upstream("slow")
    other = await make_upstream("other")
    slow.models_delay = 5.0  # the probe of `a` times out after the reload
    proxy = await make_proxy(build_config({"a": slow, "b": other}, health=PROBING), probes=True)
    await wait_for(lambda: slow.models_calls == 1)

    providers = {"b": other} if change == "removed" else {"a": other, "b": other}
    reload_to(proxy, tmp_path, build_config(providers, health={**PROBING, "probe_interval_seconds": 60}))
    await wait_for(lambda: all(task.get_name() != "manaproxy-probe-a" for task in probe_tasks()), timeout=2)

    health = proxy.gateway.health
    assert "provider a unhealthy" not in caplog.text
    if change == "removed":
        assert health.names() == ["b"]
    else:
        assert (health.breaker("a"), health.get("a").breaker.last_error) == ("closed", None)
