"""When every chain entry failed or was skipped, the answer keeps what the providers meant: a lone 404 stays a
404, 429s stay a 429 with the smallest Retry-After, entries only kept out for a while give a 503 that says
when to come back, and the entry list is in the message and in `X-Mana-LLM-Attempts`. Checked with the
openai SDK, whose retries depend on exactly that."""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import openai
import pytest

from .fakes import after, chat_answer, closed_port_url, status_reply, wait_for
from .helpers import CHAT, build_config, chat


@pytest.fixture
async def a_and_b(make_upstream):
    return await make_upstream("a"), await make_upstream("b")


async def test_a_lone_404_stays_a_404_and_the_sdk_does_not_retry_it(a_and_b, make_proxy):
    a, _ = a_and_b
    a.default = status_reply(404, "The model `m1` does not exist")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    client = proxy.sdk(max_retries=2)

    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="mana/x", messages=[{"role": "user", "content": "hi"}])
    await client.close()

    assert a.calls == 1  # a 503 made the SDK try three times
    error = caught.value.body
    assert error["message"] == "a/m1: The model `m1` does not exist"
    assert caught.value.response.headers["X-Mana-LLM-Attempts"] == "a/m1=HTTP 404"


async def test_429s_everywhere_are_a_429_with_the_smallest_retry_after(a_and_b, make_proxy):
    a, b = a_and_b
    a.default = status_reply(429, "slow down", headers={"Retry-After": "20"})
    b.default = status_reply(429, "slow down", headers={"Retry-After": "3"})  # under the 5 s cap
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}))

    resp = await proxy.client.post(CHAT, json=chat())

    assert (resp.status, resp.headers["Retry-After"]) == (429, "3")
    body = await resp.json()
    assert (body["error"]["type"], body["error"]["code"]) == ("rate_limit_error", "rate_limited")
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=HTTP 429, b/m2=HTTP 429"


async def test_entries_kept_out_for_a_while_give_a_503_that_says_when(a_and_b, make_proxy):
    a, b = a_and_b
    a.default = status_reply(500)
    b.default = status_reply(500)
    health = {"failure_threshold": 1, "backoff_seconds": 40}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health))
    await proxy.client.post(CHAT, json=chat())  # both breakers open for 40 s, their first trial in 1 s

    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"  # when the first trial goes, not the window's end
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=unhealthy, b/m2=unhealthy"
    assert (await resp.json())["error"]["code"] == "all_targets_failed"


async def test_failures_with_nothing_to_wait_for_are_a_plain_503(a_and_b, make_proxy):
    a, b = a_and_b
    a.default = status_reply(500, "boom")
    b.default = status_reply(502, "bad gateway")
    proxy = await make_proxy(
        build_config({"a": a, "b": b, "c": closed_port_url()}, {"mana/x": ["a/m1", "b/m2", "c/m3"]})
    )

    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.status == 503
    assert "Retry-After" not in resp.headers
    message = (await resp.json())["error"]["message"]
    assert message == "no chain entry could answer: a/m1=HTTP 500, b/m2=HTTP 502, c/m3=connect"
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=HTTP 500, b/m2=HTTP 502, c/m3=connect"


async def test_a_provider_refusing_our_key_is_a_502_not_the_clients_401(a_and_b, make_proxy):
    a, _ = a_and_b
    a.default = status_reply(401, "Incorrect API key provided")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))

    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.status == 502
    assert (await resp.json())["error"]["message"] == "a/m1: Incorrect API key provided"


def attempts_of(header: str) -> list[tuple[str, str]]:
    """`X-Mana-LLM-Attempts` read as its README documents it: items split on `, `, each split on its last
    `=`, each part percent-decoded."""
    return [tuple(unquote(part) for part in item.rsplit("=", 1)) for item in header.split(", ")]  # type: ignore[misc]


@pytest.mark.parametrize(
    "model",
    ["status:500,a/ok:won", "x=HTTP 200, a/y", "x%2C a/y=HTTP 200", "qwen2.5:7b", "é,=:%"],
)
async def test_a_model_name_cannot_forge_attempts(a_and_b, make_proxy, model):
    a, b = a_and_b
    a.default = status_reply(500, "boom")
    b.default = status_reply(503, "busy")
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": [f"a/{model}", "b/m2"]}))

    resp = await proxy.client.post(CHAT, json=chat())

    assert resp.status == 503
    header = resp.headers["X-Mana-LLM-Attempts"]
    assert attempts_of(header) == [(f"a/{model}", "HTTP 500"), ("b/m2", "HTTP 503")]
    message = (await resp.json())["error"]["message"]
    assert attempts_of(message.removeprefix("no chain entry could answer: ")) == attempts_of(header)


# -- issue 16: a lone entry kept out, and how long a Retry-After may say ----------------------------


async def test_a_lone_entry_s_every_request_is_its_open_models_trial_as_a_direct_call_reaches_the_provider(
    a_and_b, make_proxy
):
    a, _ = a_and_b
    a.default = status_reply(500, "model crashed", headers={"x-ratelimit-remaining-requests": "41"})
    health = {"failure_threshold": 2, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health=health))
    for _ in range(2):  # the breaker opens
        assert (await proxy.client.post(CHAT, json=chat())).status == 500

    resp = await proxy.client.post(CHAT, json=chat())  # nothing else to try: it is the trial, not 1 s later

    assert resp.status == 500
    error = (await resp.json())["error"]
    assert (error["message"], error["type"], error["code"]) == ("a/m1: model crashed", "server_error", "500")
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=HTTP 500"
    assert a.calls == 3
    a.default = chat_answer("m1")  # back: the next request finds it, as a direct call would
    resp = await proxy.client.post(CHAT, json=chat())
    assert resp.status == 200
    health_view = await (await proxy.client.get("/v1/health")).json()
    assert health_view["providers"]["a"]["models"]["m1"]["status"] == "healthy"


async def test_a_lone_entry_kept_out_while_its_trial_decides_answers_with_the_providers_last_error(a_and_b, make_proxy):
    a, _ = a_and_b
    crashed = status_reply(500, "model crashed", headers={"x-ratelimit-remaining-requests": "41"})
    a.default = crashed
    health = {"failure_threshold": 2, "backoff_seconds": 60}
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, health=health))
    for _ in range(2):  # the breaker opens
        assert (await proxy.client.post(CHAT, json=chat())).status == 500
    decided = asyncio.Event()
    a.default = after(decided, crashed)
    trial = asyncio.create_task(proxy.client.post(CHAT, json=chat()))
    await wait_for(lambda: a.calls == 3)

    resp = await proxy.client.post(CHAT, json=chat())  # one trial at a time: this one is kept out

    assert resp.status == 500  # the provider's, not our 503
    error = (await resp.json())["error"]
    assert (error["message"], error["type"], error["code"]) == ("a/m1: model crashed", "server_error", "500")
    assert resp.headers["x-ratelimit-remaining-requests"] == "41"  # its headers
    assert resp.headers["X-Mana-LLM-Attempts"] == "a/m1=unhealthy"
    assert resp.headers["Retry-After"] == "1"  # the trial under way decides: ask again in a second
    assert 1000 <= int(resp.headers["retry-after-ms"]) <= 1200
    assert a.calls == 3
    decided.set()
    assert (await trial).status == 500


@pytest.mark.parametrize(("setting", "retry_after", "millis"), [(None, "5", "5200"), (2, "2", "2200")])
async def test_every_retry_after_we_write_is_capped(a_and_b, make_proxy, setting, retry_after, millis):
    a, b = a_and_b
    a.default = status_reply(429, "slow down", headers={"Retry-After": "30"})
    b.default = status_reply(429, "slow down", headers={"Retry-After": "20"})
    health = {} if setting is None else {"max_retry_after_seconds": setting}
    proxy = await make_proxy(build_config({"a": a, "b": b}, {"mana/x": ["a/m1", "b/m2"]}, health=health))

    resp = await proxy.client.post(CHAT, json=chat())

    assert (resp.status, resp.headers["Retry-After"], resp.headers["retry-after-ms"]) == (429, retry_after, millis)
