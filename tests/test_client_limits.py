"""Named clients, their allow-lists and their limits, end to end (issue 19, items 1, 2 and 4): the official
`openai` SDK reads our 429s and `x-ratelimit-*` headers as OpenAI's; clients keep separate windows; a reload
rotates a key without dropping the request in flight."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import openai
import pytest
import yaml

from manaproxy.app import create_app
from manaproxy.config import ConfigError, parse_config

from .fakes import chat_answer, chat_completion, gated_stream, json_reply
from .helpers import CHAT, build_config, chat, parse_logfmt, value

CHAT_KEY = "sk-chat-backend-0123456789"
BOT_KEY = "sk-telegram-bot-0123456789"
ENV = {"CHAT_KEY": CHAT_KEY, "BOT_KEY": BOT_KEY}


def config_with_clients(up: Any, clients: dict[str, Any], **extra: Any) -> str:
    """Providers a and b (one fake), aliases mana/x, mana/y, and the `clients:` section given."""
    text = build_config({"a": up, "b": up}, {"mana/x": ["a/m1"], "mana/y": ["b/m2"]}, **extra)
    return text + yaml.safe_dump({"clients": clients}, sort_keys=False)


CLIENTS = {
    "chat-backend": {"key": "${CHAT_KEY}", "requests_per_minute": 2},
    "telegram-bot": {"key": "${BOT_KEY}", "requests_per_minute": 1, "models": ["mana/x", "a/*"]},
}


@pytest.fixture
async def clients(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    proxy = await make_proxy(config_with_clients(up, CLIENTS), env=ENV)
    return up, proxy


def ask(key: str, model: str = "mana/x", **body: Any) -> tuple[dict[str, Any], dict[str, str]]:
    return chat(model, **body), {"Authorization": f"Bearer {key}"}


async def post(proxy, key: str, model: str = "mana/x", **body: Any):
    payload, headers = ask(key, model, **body)
    resp = await proxy.client.post(CHAT, json=payload, headers=headers)
    await resp.read()
    return resp


async def test_the_sdk_reads_our_rate_limit_as_openais(clients):
    up, proxy = clients
    async with proxy.sdk(api_key=CHAT_KEY) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="mana/x", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.parse().choices[0].message.content
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.headers["x-ratelimit-reset-requests"] == "30s"  # one request of 2 per minute comes back in 30 s
        await client.chat.completions.create(model="mana/x", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="mana/x", messages=[{"role": "user", "content": "hi"}])

    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert "chat-backend" in error.message
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"59\.\d{1,3}s|1m0s", headers["x-ratelimit-reset-requests"])
    assert 29 <= int(headers["Retry-After"]) <= 30
    assert up.calls == 2  # refused before any upstream call


async def test_two_clients_have_separate_windows(clients):
    up, proxy = clients

    statuses = [(await post(proxy, CHAT_KEY)).status for _ in range(3)]
    bot = [(await post(proxy, BOT_KEY)).status for _ in range(2)]

    assert statuses == [200, 200, 429]
    assert bot == [200, 429]
    assert up.calls == 3
    assert (
        value(proxy, "mana_llm_client_requests_total", client="chat-backend", alias="mana/x", status_class="2xx") == 2
    )
    assert (
        value(proxy, "mana_llm_client_requests_total", client="chat-backend", alias="mana/x", status_class="4xx") == 1
    )
    assert (
        value(proxy, "mana_llm_client_requests_total", client="telegram-bot", alias="mana/x", status_class="2xx") == 1
    )
    labels = {"client": "chat-backend", "provider": "a", "model": "m1"}
    assert value(proxy, "mana_llm_client_tokens_total", **labels, type="prompt") == 10
    assert value(proxy, "mana_llm_client_tokens_total", **labels, type="completion") == 4


async def test_a_model_outside_the_allow_list_is_refused_before_routing(clients):
    up, proxy = clients
    payload, headers = ask(BOT_KEY, "mana/y")

    resp = await proxy.client.post(CHAT, json=payload, headers=headers)

    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_allowed"
    assert error["type"] == "permission_error"
    assert "mana/y" in error["message"]
    assert up.calls == 0
    # Refusals by the allow-list do not spend the window: the one request a minute is still there.
    assert (await post(proxy, BOT_KEY, "mana/x")).status == 200


@pytest.mark.parametrize(
    ("model", "allowed"),
    [("mana/x", True), ("a/m1", True), ("a/vendor/any", True), ("b/m2", False), ("mana/y", False), ("m1", False)],
)
async def test_allow_list_globs(make_upstream, make_proxy, model, allowed):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    clients = {"bot": {"key": "${BOT_KEY}", "models": ["mana/x", "a/*"]}}
    proxy = await make_proxy(config_with_clients(up, clients), env=ENV)

    resp = await post(proxy, BOT_KEY, model)

    assert resp.status == (200 if allowed else 403)
    assert up.calls == (1 if allowed else 0)


async def test_the_sdk_sees_a_refused_model_as_permission_denied(clients):
    _up, proxy = clients
    async with proxy.sdk(api_key=BOT_KEY) as client:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model="b/m2", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_allowed"


async def test_token_limits_count_the_upstream_usage_and_refuse_only_once_spent(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.default = chat_answer("m1", usage=(9, 4))  # 13 tokens an answer
    clients = {"bot": {"key": "${BOT_KEY}", "tokens_per_minute": 20}}
    proxy = await make_proxy(config_with_clients(up, clients), env=ENV)

    first = await post(proxy, BOT_KEY)  # 20 left: let in, 13 spent
    second_resp = await post(proxy, BOT_KEY, stream=True)  # 7 left: let in, and never cut (26 > 20 spent)
    third = await post(proxy, BOT_KEY)

    assert first.status == second_resp.status == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "20"
    assert first.headers["x-ratelimit-remaining-tokens"] == "20"  # counted after the answer
    assert second_resp.headers["x-ratelimit-remaining-tokens"] == "7"
    assert third.status == 429
    error = (await third.json())["error"]
    assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
    assert third.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(third.headers["Retry-After"]) >= 1
    assert up.calls == 2
    assert value(proxy, "mana_llm_client_tokens_total", client="bot", provider="a", model="m1", type="prompt") == 18


async def test_an_unlimited_clients_answers_keep_the_upstreams_ratelimit_headers(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("m1"), headers={"x-ratelimit-remaining-requests": "77"})
    clients = {"free": {"key": "${BOT_KEY}"}, "capped": {"key": "${CHAT_KEY}", "requests_per_minute": 5}}
    proxy = await make_proxy(config_with_clients(up, clients), env=ENV)

    free = await post(proxy, BOT_KEY)
    capped = await post(proxy, CHAT_KEY)

    assert free.headers["x-ratelimit-remaining-requests"] == "77"
    assert capped.headers.getall("x-ratelimit-remaining-requests") == ["4"]  # ours, in place of the upstream's


async def test_a_reload_rotates_a_key_without_dropping_the_request_in_flight(make_upstream, make_proxy, tmp_path):
    up = await make_upstream("up")
    gate = asyncio.Event()
    up.queue(gated_stream(gate))
    up.default = chat_answer("m1")
    env = {**ENV, "NEW_KEY": "sk-chat-backend-rotated-000"}
    proxy = await make_proxy(config_with_clients(up, {"chat-backend": {"key": CHAT_KEY}}), env=env)
    payload, headers = ask(CHAT_KEY, stream=True)
    in_flight = await proxy.client.post(CHAT, json=payload, headers=headers)
    assert in_flight.status == 200

    rotated = {"chat-backend": {"keys": ["sk-chat-backend-rotated-000"]}}
    assert proxy.reload_to(tmp_path, config_with_clients(up, rotated))
    gate.set()
    body = await in_flight.read()

    assert body.endswith(b"data: [DONE]\n\n")
    assert (await post(proxy, CHAT_KEY)).status == 401
    assert (await post(proxy, "sk-chat-backend-rotated-000")).status == 200
    # Both keys at once while clients move over, then the old one dropped: the usual rotation.
    both = {"chat-backend": {"keys": [CHAT_KEY, "sk-chat-backend-rotated-000"]}}
    assert proxy.reload_to(tmp_path, config_with_clients(up, both))
    assert (await post(proxy, CHAT_KEY)).status == 200
    assert (await post(proxy, "sk-chat-backend-rotated-000")).status == 200


async def test_env_clients_are_named_and_bare_keys_numbered(make_upstream, make_proxy, caplog):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    proxy = await make_proxy(
        build_config({"a": up}, {"mana/x": ["a/m1"]}), api_keys=[b"bench:sk-bench-0123456789", b"sk-bare-0123456789"]
    )

    with caplog.at_level(logging.INFO, logger="manaproxy.request"):
        assert (await post(proxy, "sk-bench-0123456789")).status == 200
        assert (await post(proxy, "sk-bare-0123456789")).status == 200
        assert (await post(proxy, "bench:sk-bench-0123456789")).status == 401
    await asyncio.sleep(0)  # the records reach the observers at the end of the loop's turn

    logged = [
        parse_logfmt(record.getMessage())["client"] for record in caplog.records if "request_id=" in record.getMessage()
    ]
    assert logged == ["bench", "key-2"]
    assert value(proxy, "mana_llm_client_requests_total", client="key-2", alias="mana/x", status_class="2xx") == 1
    assert "sk-bench" not in caplog.text
    assert "sk-bare" not in caplog.text


async def test_with_auth_off_every_request_is_anonymous(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat("a/m1"))

    assert resp.status == 200
    assert value(proxy, "mana_llm_client_requests_total", client="anonymous", alias="direct", status_class="2xx") == 1


async def test_a_key_in_both_places_is_a_config_error(make_upstream, make_proxy, tmp_path):
    up = await make_upstream("up")
    text = config_with_clients(up, {"chat-backend": {"key": "${CHAT_KEY}"}})
    config = parse_config(text, env=ENV)
    with pytest.raises(ConfigError, match=r"MANAPROXY_API_KEYS\[1\]|clients\.chat-backend") as caught:
        create_app(config, api_keys=[CHAT_KEY.encode()])
    assert CHAT_KEY not in str(caught.value)

    # On reload, the old config keeps serving.
    up.default = chat_answer("m1")
    proxy = await make_proxy(build_config({"a": up, "b": up}, {"mana/x": ["a/m1"]}), api_keys=[CHAT_KEY.encode()])
    assert not proxy.reloader.reload(str(_write(tmp_path, text, ENV)))
    assert (await post(proxy, CHAT_KEY)).status == 200


def _write(tmp_path, text: str, env: dict[str, str]):
    """`text` with its `${VAR}`s written out (the reload reads the process environment, not the test's)."""
    for name, secret in env.items():
        text = text.replace("${" + name + "}", secret)
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    return path


async def test_a_clients_own_refusals_stay_out_of_the_failures_ring_and_a_cache_hit_counts_for_it(
    make_upstream, make_proxy
):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    text = config_with_clients(up, {"chat-backend": {"key": "${CHAT_KEY}", "requests_per_minute": 2}})
    raw = yaml.safe_load(text)
    raw["aliases"]["mana/x"] = {"chain": ["a/m1"], "cache": True}
    proxy = await make_proxy(yaml.safe_dump(raw, sort_keys=False), env=ENV)

    statuses = [(await post(proxy, CHAT_KEY)).status for _ in range(4)]  # a miss, a hit, then over the limit

    assert statuses == [200, 200, 429, 429]
    assert (
        value(proxy, "mana_llm_client_requests_total", client="chat-backend", alias="mana/x", status_class="2xx") == 2
    )
    resp = await proxy.client.get("/v1/failures", headers={"Authorization": f"Bearer {CHAT_KEY}"})
    assert (await resp.json())["failures"] == []  # its own limit: no provider failed, nothing fell back
