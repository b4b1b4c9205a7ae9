"""The provider contract (`providers/base.py`, `Provider`), run alike against every provider kind.

Each test is one obligation of a kind, parametrised with the kinds it applies to: `openai` in front of a
`FakeUpstream`, `google` (google-genai) in front of a `FakeGemini`, and `faulty`, the test kind that has
no upstream, where the obligation is about the request path's side of the contract. The kinds are
scripted alike (`fakes.ScriptedKind`); a new kind gets a `ScriptedKind` of its own, joins `ALL` (and
`WIRE` if an upstream stands behind it), and passes this suite. Kind-specific detail stays in the kinds'
own test files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from manaproxy.config import KINDS
from manaproxy.providers.base import Provider, UpstreamFailure

from .fakes import (
    CONTRACT_KEY,
    FAULTY_KIND,
    FakeGemini,
    FakeUpstream,
    FaultyKind,
    GoogleKind,
    OpenAIKind,
    ScriptedKind,
    chat_answer,
    wait_for,
)
from .helpers import CHAT, DONE, FAST, Proxy, build_config, chat, events_of, value

ALL = ["openai", "google", "faulty"]
WIRE = ["openai", "google"]  # the kinds with an upstream on the wire behind them
LIMIT = 64 * 1024  # max_response_bytes and max_event_bytes of the bounded tests
PATIENT = {"connect": 2, "first_byte": 5, "idle": 5, "total": 20}  # an unenforced bound shows as itself


@pytest.fixture
async def kind(
    request: pytest.FixtureRequest, make_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ScriptedKind]:
    """The kind named by the test's parameter, with what stands behind it."""
    if request.param == "openai":
        yield OpenAIKind(await make_upstream("openai"))
    elif request.param == "google":
        gemini = await FakeGemini().start()
        yield GoogleKind(gemini)
        await gemini.close()
    else:
        monkeypatch.setitem(KINDS, "faulty", FAULTY_KIND)
        yield FaultyKind()


def config_of(kind: ScriptedKind, backup: FakeUpstream | None = None, **settings: Any) -> str:
    """Alias mana/c = [<kind>/<model>] (then backup/m2 when there is a backup); `settings`: `server`, `timeouts`."""
    spec = {**kind.spec(), **({"timeouts": settings["timeouts"]} if "timeouts" in settings else {})}
    providers: dict[str, Any] = {kind.name: spec}
    chain = [target(kind)]
    if backup is not None:
        providers["backup"] = backup
        chain.append("backup/m2")
    return build_config(providers, {"mana/c": chain}, server=settings.get("server"))


async def serve(
    kind: ScriptedKind, make_proxy: Any, make_upstream: Any = None, **settings: Any
) -> tuple[Proxy, FakeUpstream | None]:
    """The proxy for `kind` (with a backup entry after it when `make_upstream` is given) and the backup."""
    backup = None
    if make_upstream is not None:
        backup = await make_upstream("backup")
        backup.default = chat_answer("m2")
    return await make_proxy(config_of(kind, backup, **settings)), backup


def target(kind: ScriptedKind) -> str:
    return f"{kind.name}/{kind.model}"


def provider_of(proxy: Proxy, kind: ScriptedKind) -> Any:
    return proxy.gateway.runtime.providers[kind.name]


def request(*, stream: bool) -> dict[str, Any]:
    return chat("mana/c", stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))


def data_events(body: bytes) -> list[Any]:
    """The decoded `data:` payloads of a relayed stream (`"[DONE]"` for the end marker)."""
    found = []
    for event in events_of(body):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[len(b"data: ") :]
                found.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return found


def assert_ended_with_one_error_event(body: bytes) -> dict[str, Any]:
    """The stream ends with our one error event and no end marker; its `error` object."""
    events = data_events(body)
    assert "[DONE]" not in events, body[-300:]
    errors = [event for event in events if "error" in event]
    assert len(errors) == 1, body[-300:]
    assert events[-1] is errors[0]
    error: dict[str, Any] = errors[0]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def fallbacks(proxy: Proxy, kind: ScriptedKind, reason: str) -> float:
    return value(proxy, "mana_llm_fallback_total", from_model=target(kind), to_model="backup/m2", reason=reason)


# -- client-ready answers, usage counted ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "stream"),
    [
        pytest.param("openai", False, id="openai"),
        pytest.param("openai", True, id="openai-stream"),
        pytest.param("google", False, id="google"),
        pytest.param("google", True, id="google-stream"),
        pytest.param("faulty", True, id="faulty-stream"),
    ],
    indirect=["kind"],
)
async def test_an_answer_is_client_ready_and_its_usage_reported(kind, make_proxy, stream):
    kind.stream() if stream else kind.answer()
    proxy, _ = await serve(kind, make_proxy)

    resp = await proxy.client.post(CHAT, json=request(stream=stream))
    body = await resp.read()

    assert resp.status == 200, body
    assert resp.headers["X-Mana-LLM-Resolved"] == target(kind)
    answers = data_events(body) if stream else [orjson.loads(body)]
    if stream:
        assert answers.pop() == "[DONE]"
    assert answers
    assert {answer.get("model") for answer in answers} == {target(kind)}  # the upstream's name never shows
    labels = {"provider": kind.name, "model": kind.model}
    counted = tuple(value(proxy, "mana_llm_tokens_total", **labels, type=side) for side in ("prompt", "completion"))
    assert counted == kind.usage


# -- bounded answers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", WIRE, indirect=True)
async def test_an_answer_past_max_response_bytes_fails_the_attempt_and_the_chain_moves_on(
    kind, make_proxy, make_upstream
):
    kind.larger_answer(4 * LIMIT)
    proxy, _ = await serve(kind, make_proxy, make_upstream, server={"max_response_bytes": LIMIT})

    resp = await proxy.client.post(CHAT, json=request(stream=False))
    body = await resp.read()

    assert resp.status == 200, body
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert fallbacks(proxy, kind, "too_large") == 1


# Just past the bound, an event tends to arrive in one read; far past it, in many.
PAST = [pytest.param(LIMIT + LIMIT // 8, id="just-past"), pytest.param(4 * LIMIT, id="far-past")]


@pytest.mark.parametrize("size", PAST)
@pytest.mark.parametrize("kind", WIRE, indirect=True)
async def test_a_first_event_past_max_event_bytes_fails_the_attempt_and_the_chain_moves_on(
    kind, make_proxy, make_upstream, size
):
    kind.larger_first_event(size)
    proxy, _ = await serve(kind, make_proxy, make_upstream, server={"max_event_bytes": LIMIT}, timeouts=PATIENT)

    resp = await proxy.client.post(CHAT, json=request(stream=True))
    body = await resp.read()

    assert resp.status == 200, body
    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert b"x" * 1000 not in body
    assert fallbacks(proxy, kind, "too_large") == 1


@pytest.mark.parametrize("size", PAST)
@pytest.mark.parametrize("kind", WIRE, indirect=True)
async def test_an_event_past_max_event_bytes_after_the_first_ends_the_stream_with_an_error_event(
    kind, make_proxy, make_upstream, size
):
    kind.larger_later_event(size)
    proxy, backup = await serve(kind, make_proxy, make_upstream, server={"max_event_bytes": LIMIT}, timeouts=PATIENT)

    resp = await proxy.client.post(CHAT, json=request(stream=True))
    body = await resp.read()

    assert resp.headers["X-Mana-LLM-Resolved"] == target(kind)
    error = assert_ended_with_one_error_event(body)
    assert f"larger than {LIMIT} bytes" in error["message"]
    assert b"x" * 1000 not in body  # nothing of the oversized event went by
    assert backup.calls == 0  # committed: never another provider


# -- failures mid-stream, timeouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL, indirect=True)
async def test_a_mid_stream_failure_ends_with_one_error_event_and_no_end_marker(kind, make_proxy, make_upstream):
    kind.cut_after_first()
    proxy, backup = await serve(kind, make_proxy, make_upstream)

    resp = await proxy.client.post(CHAT, json=request(stream=True))
    body = await resp.read()

    assert resp.status == 200
    assert resp.headers["X-Mana-LLM-Resolved"] == target(kind)
    error = assert_ended_with_one_error_event(body)
    assert error["code"] == "upstream_error"
    assert target(kind) in error["message"]
    assert backup.calls == 0


@pytest.mark.parametrize("kind", ALL, indirect=True)
async def test_a_stream_that_ends_short_of_its_end_never_looks_complete(kind, make_proxy, make_upstream):
    kind.end_short()
    proxy, backup = await serve(kind, make_proxy, make_upstream)

    resp = await proxy.client.post(CHAT, json=request(stream=True))
    body = await resp.read()

    assert resp.headers["X-Mana-LLM-Resolved"] == target(kind)
    assert assert_ended_with_one_error_event(body)["code"] == "upstream_error"
    assert backup.calls == 0


@pytest.mark.parametrize("kind", WIRE, indirect=True)
async def test_a_silence_mid_stream_ends_with_an_idle_timeout_error_event(kind, make_proxy):
    kind.silent_after_first()
    proxy, _ = await serve(kind, make_proxy, timeouts=FAST)

    async with asyncio.timeout(5):
        resp = await proxy.client.post(CHAT, json=request(stream=True))
        body = await resp.read()

    assert assert_ended_with_one_error_event(body)["code"] == "idle_timeout"
    await wait_for(lambda: kind.upstream_hung_up(provider_of(proxy, kind)), timeout=3)


@pytest.mark.parametrize("kind", WIRE, indirect=True)
async def test_no_first_event_within_first_byte_fails_the_attempt_and_the_chain_moves_on(
    kind, make_proxy, make_upstream
):
    kind.silent_before_first()
    proxy, _ = await serve(kind, make_proxy, make_upstream, timeouts=FAST)

    async with asyncio.timeout(5):
        resp = await proxy.client.post(CHAT, json=request(stream=True))
        body = await resp.read()

    assert resp.headers["X-Mana-LLM-Resolved"] == "backup/m2"
    assert body.endswith(DONE)
    assert fallbacks(proxy, kind, "timeout") == 1


@pytest.mark.parametrize("kind", ALL, indirect=True)
async def test_a_client_that_leaves_mid_stream_gets_the_upstream_torn_down(kind, make_proxy):
    kind.silent_after_first()
    proxy, _ = await serve(kind, make_proxy, timeouts=PATIENT)

    resp = await proxy.client.post(CHAT, json=request(stream=True))
    assert b"data: " in await resp.content.readuntil(b"\n\n")  # committed: the relay waits on the upstream
    resp.close()  # the client goes away mid-answer

    await wait_for(lambda: kind.upstream_hung_up(provider_of(proxy, kind)), timeout=3)


# -- our key -----------------------------------------------------------------------------------------------------


def script_echo(kind: ScriptedKind, case: str) -> bool:
    """Script the upstream to quote our key in `case`; whether the request streams."""
    if case == "caller-error":
        kind.echo_key_error(400)
    elif case == "exhausted":
        kind.echo_key_error(503)
    elif case == "answer-headers":
        kind.echo_key_answer(stream=False)
    elif case == "stream-headers":
        kind.echo_key_answer(stream=True)
    else:
        kind.echo_key_event()
    return case in ("stream-headers", "error-event")


@pytest.mark.parametrize("case", ["caller-error", "exhausted", "answer-headers", "stream-headers", "error-event"])
@pytest.mark.parametrize("kind", WIRE, indirect=True)
async def test_our_key_never_reaches_the_client_even_when_the_upstream_echoes_it(kind, make_proxy, caplog, case):
    caplog.set_level(logging.DEBUG)
    stream = script_echo(kind, case)
    proxy, _ = await serve(kind, make_proxy)

    resp = await proxy.client.post(CHAT, json=request(stream=stream))
    body = await resp.read()
    health = await (await proxy.client.get("/v1/health")).read()

    received = "\n".join([str(resp.status), *(f"{k}: {v}" for k, v in resp.headers.items()), body.decode()])
    assert CONTRACT_KEY not in received
    assert CONTRACT_KEY not in health.decode()
    assert CONTRACT_KEY not in caplog.text
    if case == "error-event":  # the event itself is not relayed: the stream ends with our own error event
        assert_ended_with_one_error_event(body)


# -- aclose, and when the runtime calls it ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL, indirect=True)
async def test_aclose_releases_what_the_kind_holds_and_nothing_shared(kind, make_proxy):
    kind.silent_after_first()  # a stream the client abandons: its close may still be under way at aclose
    proxy, _ = await serve(kind, make_proxy, timeouts=PATIENT)
    provider: Provider = provider_of(proxy, kind)
    resp = await proxy.client.post(CHAT, json=request(stream=True))
    await resp.content.readuntil(b"\n\n")
    resp.close()
    await wait_for(lambda: kind.upstream_hung_up(provider), timeout=3)

    await provider.aclose()
    assert kind.held(provider) == []
    await provider.aclose()  # idempotent
    assert kind.held(provider) == []
    assert proxy.gateway.session is not None
    assert not proxy.gateway.session.closed  # the application's, shared with the next runtime's providers
    try:  # a late probe holding the closed provider answers or fails cleanly, never hangs
        async with asyncio.timeout(5):
            await provider.probe(2)
    except UpstreamFailure:
        pass


@pytest.mark.parametrize("kind", ALL, indirect=True)
async def test_a_reload_closes_the_replaced_provider_once_its_requests_have_ended(kind, make_proxy, tmp_path: Path):
    kind.stream_until_released()
    proxy, _ = await serve(kind, make_proxy)
    old = provider_of(proxy, kind)
    holding = kind.held(old)

    resp = await proxy.client.post(CHAT, json=request(stream=True))
    first = await resp.content.readuntil(b"\n\n")
    assert proxy.reload_to(tmp_path, config_of(kind))
    new = provider_of(proxy, kind)
    assert new is not old
    await asyncio.sleep(0.1)
    assert kind.held(old) == holding  # not closed under the request still running on it

    kind.release(old)
    body = first + await resp.read()
    assert body.endswith(DONE)  # the answer in flight was whole
    await wait_for(lambda: kind.held(old) == [], timeout=3)
    assert kind.held(new) == holding  # the new runtime's provider is not touched


@pytest.mark.parametrize("kind", ALL, indirect=True)
async def test_shutdown_closes_every_provider(kind, make_proxy):
    kind.stream()
    proxy, _ = await serve(kind, make_proxy)
    assert (await (await proxy.client.post(CHAT, json=request(stream=True))).read()).endswith(DONE)
    provider = provider_of(proxy, kind)

    await proxy.client.close()  # the app's cleanup

    assert kind.held(provider) == []
