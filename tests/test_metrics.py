"""Metrics after real requests through the proxy: values read from the registry and from `GET /metrics`.

Names and labels are a contract with the existing mana-llm dashboard (issue 4); docs/metrics.md is the
reference these tests hold the code to.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from manaproxy.app import create_app
from manaproxy.config import parse_config
from manaproxy.probe import probe_one
from manaproxy.record import RequestRecord

from .fakes import (
    after,
    chat_answer,
    chat_chunks,
    chat_completion,
    closed_port_url,
    drop_connection,
    hang,
    json_reply,
    sse_reply,
    status_reply,
    wait_for,
)
from .helpers import (
    CHAT,
    FAST,
    build_config,
    chat,
    exists,
    post_chat,
    run_promtool,
    scrape,
    two_entry_proxy,
    value,
    varied_traffic,
)

# -- answered requests ------------------------------------------------------------------------------


async def test_alias_request_is_labelled_with_the_resolved_target(make_upstream, make_proxy):
    _a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)

    await post_chat(proxy, chat())

    assert value(proxy, "mana_llm_alias_resolved_total", alias="mana/x", target="a/m1") == 1
    assert value(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="false") == 1
    assert value(proxy, "mana_llm_llm_latency_seconds_count", provider="a", model="m1") == 1
    assert value(proxy, "mana_llm_tokens_total", provider="a", model="m1", type="prompt") == 5
    assert value(proxy, "mana_llm_tokens_total", provider="a", model="m1", type="completion") == 2
    # The alias never labels the success side; an unstreamed answer has no TTFT and no stream outcome.
    assert not exists(proxy, "mana_llm_llm_requests_total", provider="mana", model="mana/x", streaming="false")
    assert not exists(proxy, "mana_llm_time_to_first_byte_seconds_count", provider="a", model="m1")
    assert "mana_llm_stream_outcomes_total{" not in await scrape(proxy)
    assert value(proxy, "mana_llm_proxy_overhead_seconds_count") == 1
    assert 0 < value(proxy, "mana_llm_proxy_overhead_seconds_sum") < 0.1
    labels = {"method": "POST", "endpoint": "/v1/chat/completions", "status": "200"}
    assert value(proxy, "mana_llm_requests_total", **labels) == 1
    assert value(proxy, "mana_llm_request_latency_seconds_count", method="POST", endpoint="/v1/chat/completions") == 1


async def test_streamed_answer_counts_usage_chunk_tokens_ttft_and_completed(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply(chat_chunks("m1", ["Hel", "lo"], usage=(11, 7)))

    client = proxy.sdk()
    stream = await client.chat.completions.create(
        model="mana/x",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert chunks[-1].usage is not None

    await wait_for(lambda: exists(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="true"))
    assert value(proxy, "mana_llm_tokens_total", provider="a", model="m1", type="prompt") == 11
    assert value(proxy, "mana_llm_tokens_total", provider="a", model="m1", type="completion") == 7
    assert value(proxy, "mana_llm_stream_outcomes_total", provider="a", outcome="completed") == 1
    assert value(proxy, "mana_llm_time_to_first_byte_seconds_count", provider="a", model="m1") == 1
    assert value(proxy, "mana_llm_llm_latency_seconds_count", provider="a", model="m1") == 1


async def test_direct_and_bare_models_are_labelled_provider_and_model(make_upstream, make_proxy):
    ollama = await make_upstream("ollama")
    ollama.default = chat_answer("gemma3:4b")
    proxy = await make_proxy(build_config({"ollama": ollama}, {"mana/local": ["ollama/gemma3:4b"]}))

    await post_chat(proxy, chat("gemma3:4b"))
    await post_chat(proxy, chat("ollama/gemma3:4b", stream=True))
    await post_chat(proxy, chat("ollama/not-in-any-chain"))

    assert value(proxy, "mana_llm_llm_requests_total", provider="ollama", model="gemma3:4b", streaming="false") == 1
    assert value(proxy, "mana_llm_llm_requests_total", provider="ollama", model="gemma3:4b", streaming="true") == 1
    # A model named by no alias chain is the client's string: counted, but as `other`.
    assert value(proxy, "mana_llm_llm_requests_total", provider="ollama", model="other", streaming="false") == 1
    assert "mana_llm_alias_resolved_total{" not in await scrape(proxy)


# -- fallbacks --------------------------------------------------------------------------------------


async def _connect(make_upstream, make_proxy):
    _a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"base_url": closed_port_url()})
    await post_chat(proxy, chat())
    return proxy


async def _timeout(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"timeouts": FAST})
    a.default = hang()
    await post_chat(proxy, chat(stream=True))
    return proxy


async def _http_500(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = status_reply(500)
    await post_chat(proxy, chat())
    return proxy


async def _closed(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = drop_connection()
    await post_chat(proxy, chat())
    return proxy


async def _error_event(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = sse_reply([{"error": {"message": "overloaded"}}])
    await post_chat(proxy, chat(stream=True))
    return proxy


async def _unconfigured(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"api_key": "${UNSET_VAR}"})
    await post_chat(proxy, chat())
    assert a.calls == 0
    return proxy


async def _unhealthy(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, health={"failure_threshold": 1})
    a.default = status_reply(500)
    await post_chat(proxy, chat())  # http_500 opens a's breaker
    await post_chat(proxy, chat())
    assert a.calls == 1
    return proxy


async def _rate_limited(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = status_reply(429, "slow down", headers={"Retry-After": "30"})
    await post_chat(proxy, chat())  # http_429 with Retry-After keeps a out
    await post_chat(proxy, chat())
    assert a.calls == 1
    return proxy


async def _saturated(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"max_concurrent": 1})
    release = asyncio.Event()
    a.queue(after(release, json_reply(chat_completion("m1"))))
    held = asyncio.create_task(post_chat(proxy, chat()))
    await wait_for(lambda: a.calls == 1)
    await post_chat(proxy, chat())
    release.set()
    await held
    return proxy


@pytest.mark.parametrize(
    ("scenario", "reason", "earlier"),
    [
        (_connect, "connect", None),
        (_timeout, "timeout", None),
        (_http_500, "http_500", None),
        (_closed, "closed", None),
        (_error_event, "error_event", None),
        (_unconfigured, "unconfigured", None),
        (_unhealthy, "unhealthy", "http_500"),
        (_rate_limited, "rate_limited", "http_429"),
        (_saturated, "saturated", None),
    ],
    ids=lambda p: p.__name__.strip("_") if callable(p) else None,
)
async def test_each_fallback_reason_is_counted_from_and_to(make_upstream, make_proxy, scenario, reason, earlier):
    proxy = await scenario(make_upstream, make_proxy)

    assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason=reason) == 1
    if earlier is not None:  # the failure that put the provider out
        assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason=earlier) == 1
    assert value(proxy, "mana_llm_alias_resolved_total", alias="mana/x", target="b/m2") >= 1
    text = await scrape(proxy)
    fallback_lines = [line for line in text.splitlines() if line.startswith("mana_llm_fallback_total{")]
    assert len(fallback_lines) == (1 if earlier is None else 2), fallback_lines
    assert 'to_model=""' not in text


async def test_chain_running_out_counts_to_model_empty_and_an_error_on_the_alias(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = status_reply(500)
    b.default = status_reply(502)

    await post_chat(proxy, chat(), status=503)

    assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason="http_500") == 1
    assert value(proxy, "mana_llm_fallback_total", from_model="b/m2", to_model="", reason="http_502") == 1
    # The error side is labelled with what the caller asked for: the alias.
    assert value(proxy, "mana_llm_llm_errors_total", provider="mana", model="mana/x", error_type="all_failed") == 1
    assert value(proxy, "mana_llm_llm_requests_total", provider="mana", model="mana/x", streaming="false") == 1
    assert "mana_llm_alias_resolved_total{" not in await scrape(proxy)


async def test_relayed_caller_error_is_where_the_fallback_went(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = status_reply(500)
    b.default = status_reply(400, "bad messages")

    await post_chat(proxy, chat(), status=400)

    # The chain did not run out: b answered (with the caller's error).
    assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason="http_500") == 1
    assert value(proxy, "mana_llm_llm_errors_total", provider="mana", model="mana/x", error_type="http_400") == 1
    assert value(proxy, "mana_llm_llm_requests_total", provider="mana", model="mana/x", streaming="false") == 1
    assert 'to_model=""' not in await scrape(proxy)


async def test_client_leaving_during_the_next_entry_is_not_a_chain_run_out(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    a.default = status_reply(500)
    b.default = hang()

    request = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: b.calls == 1)
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)

    await wait_for(
        lambda: exists(proxy, "mana_llm_llm_requests_total", provider="mana", model="mana/x", streaming="true")
    )
    assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason="http_500") == 1
    assert "mana_llm_llm_errors_total{" not in await scrape(proxy)  # the client left: not an error


async def test_client_leaving_mid_race_counts_the_fallback_to_the_target_in_flight(make_upstream, make_proxy):
    """Hedged: the primary is late, the hedge fails, the third entry starts; the client leaves. The entry
    the request went to after b/m2 is c/m3, not the chain's second entry (b/m2 itself)."""
    a, b, c = [await make_upstream(name) for name in "abc"]
    a.default = c.default = hang()
    b.default = status_reply(500)
    spec = {"chain": ["a/m1", "b/m2", "c/m3"], "hedge_after": 0.05}
    proxy = await make_proxy(build_config({"a": a, "b": b, "c": c}, {"mana/x": spec}))

    request = asyncio.create_task(proxy.client.post(CHAT, json=chat(stream=True)))
    await wait_for(lambda: c.calls == 1)
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)

    await wait_for(
        lambda: exists(proxy, "mana_llm_llm_requests_total", provider="mana", model="mana/x", streaming="true")
    )
    assert value(proxy, "mana_llm_fallback_total", from_model="b/m2", to_model="c/m3", reason="http_500") == 1
    fallback_lines = [line for line in (await scrape(proxy)).splitlines() if line.startswith("mana_llm_fallback")]
    assert len(fallback_lines) == 1, fallback_lines  # the racers cancelled when the client left are no fallbacks


# -- stream outcomes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behavior", "outcome"),
    [
        (sse_reply(chat_chunks("m1", ["a", "b", "c"]), cut_after=2), "upstream_error"),
        (sse_reply(chat_chunks("m1", ["a", "b", "c"]), hang_after=2), "idle_timeout"),
        (sse_reply(chat_chunks("m1", ["a", "b", "c"]), done=False), "upstream_error"),
    ],
    ids=["cut", "idle", "no-done"],
)
async def test_stream_failing_after_commit_counts_its_outcome(make_upstream, make_proxy, behavior, outcome):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"timeouts": FAST})
    a.default = behavior

    body = await post_chat(proxy, chat(stream=True))

    assert b"data: [DONE]" not in body
    assert value(proxy, "mana_llm_stream_outcomes_total", provider="a", outcome=outcome) == 1
    # Committed: the request belongs to a/m1; the error is counted against what the caller asked for.
    assert value(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="true") == 1
    assert value(proxy, "mana_llm_llm_errors_total", provider="mana", model="mana/x", error_type=outcome) == 1
    assert "mana_llm_fallback_total{" not in await scrape(proxy)


async def test_client_disconnect_mid_stream_counts_client_disconnected(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"timeouts": {"idle": 30}})
    a.default = sse_reply(chat_chunks("m1", ["a", "b", "c"]), hang_after=2)

    resp = await proxy.client.post(CHAT, json=chat(stream=True))
    assert resp.status == 200
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
    resp.close()

    await wait_for(
        lambda: value(proxy, "mana_llm_stream_outcomes_total", provider="a", outcome="client_disconnected") == 1
    )
    assert value(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="true") == 1
    assert "mana_llm_llm_errors_total{" not in await scrape(proxy)


# -- gauges -----------------------------------------------------------------------------------------


async def test_requests_in_flight_while_an_upstream_holds_a_request(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    release = asyncio.Event()
    a.queue(after(release, json_reply(chat_completion("m1"))))
    assert value(proxy, "mana_llm_requests_in_flight", provider="a") == 0

    held = asyncio.create_task(post_chat(proxy, chat()))
    await wait_for(lambda: a.calls == 1)
    assert value(proxy, "mana_llm_requests_in_flight", provider="a") == 1
    assert 'mana_llm_requests_in_flight{provider="a"} 1.0' in await scrape(proxy)
    assert value(proxy, "mana_llm_requests_in_flight", provider="b") == 0

    release.set()
    await held
    assert value(proxy, "mana_llm_requests_in_flight", provider="a") == 0


async def test_provider_healthy_follows_breaker_transitions(make_upstream, make_proxy):
    a, _b, proxy = await two_entry_proxy(
        make_upstream, make_proxy, health={"failure_threshold": 1, "backoff_seconds": 0.2}
    )
    # Set at startup for every configured provider, before any traffic.
    assert value(proxy, "mana_llm_provider_healthy", provider="a") == 1
    assert value(proxy, "mana_llm_provider_healthy", provider="b") == 1
    assert value(proxy, "mana_llm_alias_healthy_targets", alias="mana/x") == 2

    a.models_status = 401  # our key refused, the probe says: the provider's breaker
    await probe_one(proxy.gateway, proxy.gateway.runtime.providers["a"], 1.0)
    assert value(proxy, "mana_llm_provider_healthy", provider="a") == 0
    assert value(proxy, "mana_llm_alias_healthy_targets", alias="mana/x") == 1

    await asyncio.sleep(0.25)  # backoff over: half-open, the next success closes the breaker
    assert value(proxy, "mana_llm_provider_healthy", provider="a") == 0
    await post_chat(proxy, chat())
    assert a.calls == 1
    assert value(proxy, "mana_llm_provider_healthy", provider="a") == 1
    assert value(proxy, "mana_llm_alias_healthy_targets", alias="mana/x") == 2


async def test_alias_with_every_entry_down(make_upstream, make_proxy):
    a, b, proxy = await two_entry_proxy(make_upstream, make_proxy, health={"failure_threshold": 1})
    a.default = status_reply(500)
    b.default = status_reply(503)

    await post_chat(proxy, chat(), status=503)
    await post_chat(proxy, chat(), status=503)

    assert value(proxy, "mana_llm_alias_healthy_targets", alias="mana/x") == 0
    assert value(proxy, "mana_llm_fallback_total", from_model="b/m2", to_model="", reason="http_503") == 1
    assert value(proxy, "mana_llm_fallback_total", from_model="a/m1", to_model="b/m2", reason="unhealthy") == 1
    assert value(proxy, "mana_llm_fallback_total", from_model="b/m2", to_model="", reason="unhealthy") == 1
    assert value(proxy, "mana_llm_llm_errors_total", provider="mana", model="mana/x", error_type="all_failed") == 2


async def test_unconfigured_provider_has_no_health_series(make_upstream, make_proxy):
    _a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy, a_spec={"api_key": ""})

    assert not exists(proxy, "mana_llm_provider_healthy", provider="a")
    assert value(proxy, "mana_llm_provider_healthy", provider="b") == 1
    assert value(proxy, "mana_llm_alias_healthy_targets", alias="mana/x") == 1


# -- HTTP-level metrics and label bounds ------------------------------------------------------------


async def test_http_endpoint_label_is_the_route_pattern(make_upstream, make_proxy):
    _a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)
    secret = uuid.uuid4().hex

    assert (await proxy.client.get(f"/v1/models/a/{secret}")).status == 404
    assert (await proxy.client.get(f"/{secret}")).status == 404
    assert (await proxy.client.post(f"/v1/{secret}", json=chat())).status == 200
    assert (await proxy.client.patch("/health")).status == 405

    assert value(proxy, "mana_llm_requests_total", method="GET", endpoint="/v1/models/{model}", status="404") == 1
    assert value(proxy, "mana_llm_requests_total", method="GET", endpoint="other", status="404") == 1
    assert value(proxy, "mana_llm_requests_total", method="POST", endpoint="/v1/{path}", status="200") == 1
    assert value(proxy, "mana_llm_requests_total", method="PATCH", endpoint="other", status="405") == 1
    assert secret not in await scrape(proxy)


async def test_hostile_model_strings_never_become_label_values(make_upstream, make_proxy):
    ollama = await make_upstream("ollama")
    ollama.default = chat_answer("whatever")
    broken = await make_upstream("broken")
    broken.default = status_reply(500)
    proxy = await make_proxy(
        build_config({"ollama": ollama, "broken": broken}, {"mana/x": ["broken/m", "ollama/gemma3:4b"]})
    )
    hostile = [uuid.uuid4().hex for _ in range(8)]
    huge = "Z" * 10_000
    models = [
        f"mana/{hostile[0]}",  # an alias that does not exist
        f"{hostile[1]}/m",  # a provider that does not exist
        hostile[2],  # a bare model: ollama answers it
        f"ollama/{hostile[3]}",  # a configured provider, a model no chain names: answered
        f"broken/{hostile[4]}",  # a configured provider that fails: fallback from an unknown target
        f"mana/{huge}",
        huge,
        f"ollama/{huge}",
        f"{huge}/{huge}",
    ]
    for model in models:
        for stream in (False, True):
            # X-Mana-LLM-Resolved echoes a direct model: allow the 10 kB header line through.
            resp = await proxy.client.post(
                CHAT, json=chat(model, stream=stream), headers={"X-Request-ID": hostile[5]}, max_field_size=1 << 16
            )
            await resp.read()
    await proxy.client.get(f"/v1/models/{hostile[6]}")
    await proxy.client.post(f"/v1/{hostile[7]}", json=chat(hostile[7]))

    text = await scrape(proxy)
    for token in hostile:
        assert token not in text
    assert "ZZZZ" not in text
    # Every label value comes from the config, our own words, or `other`.
    # (>= : a length limit on model strings may turn the 10 kB ones into invalid_model errors.)
    assert value(proxy, "mana_llm_llm_requests_total", provider="ollama", model="other", streaming="true") >= 2
    assert value(proxy, "mana_llm_llm_errors_total", provider="mana", model="other", error_type="model_not_found") >= 2
    assert value(proxy, "mana_llm_fallback_total", from_model="other", to_model="", reason="http_500") == 2
    longest = max(len(line) for line in text.splitlines())
    assert longest < 400


async def test_words_of_our_own_are_bounded_too(make_proxy, faulty_kind):
    """A provider module that lets client text into a failure reason (a bug) still cannot make it a label:
    reasons, error types and outcomes are short words of our own, or `other`."""
    providers = {"f": {"kind": faulty_kind, "base_url": "http://127.0.0.1:9/v1"}}
    proxy = await make_proxy(build_config(providers, {"mana/x": ["f/stream"]}))
    client_text = f"Client-Text {uuid.uuid4().hex}"

    await post_chat(proxy, chat(f"f/caller:{client_text}"), status=400)
    await post_chat(proxy, chat(f"f/fallback:{client_text}"), status=503)

    text = await scrape(proxy)
    assert uuid.UUID(client_text.split()[1]).hex not in text
    assert value(proxy, "mana_llm_llm_errors_total", provider="f", model="other", error_type="other") == 1
    assert value(proxy, "mana_llm_fallback_total", from_model="other", to_model="", reason="other") == 1


async def test_a_failing_observer_costs_neither_the_answer_nor_the_other_observers(make_upstream, make_proxy, caplog):
    """Metrics and the request log observe each finished request (`Gateway.observers`); one that raises is
    logged and skipped."""
    _a, _b, proxy = await two_entry_proxy(make_upstream, make_proxy)

    def broken(record: RequestRecord) -> None:
        raise RuntimeError("observer bug")

    proxy.gateway.observers.insert(0, broken)
    caplog.set_level(logging.INFO, logger="manaproxy.request")

    resp = await proxy.client.post(CHAT, json=chat(), headers={"X-Request-ID": "observed-1"})

    assert resp.status == 200
    assert (await resp.json())["model"] == "a/m1"
    assert value(proxy, "mana_llm_llm_requests_total", provider="a", model="m1", streaming="false") == 1
    assert "request_id=observed-1 " in caplog.text  # the request log line, another observer
    assert "RuntimeError: observer bug" in caplog.text


# -- the scrape as a whole --------------------------------------------------------------------------


async def assert_promtool_accepts(text: str) -> None:
    """`promtool check metrics` exits 0 with no lint remark at all."""
    result = await asyncio.to_thread(run_promtool, "check", "metrics", input=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).strip() == ""


async def test_scrape_passes_promtool_check_metrics(make_upstream, make_proxy):
    proxy = await varied_traffic(make_upstream, make_proxy)
    text = await scrape(proxy)

    await assert_promtool_accepts(text)


async def test_production_registry_with_process_collectors_passes_promtool(make_upstream, aiohttp_client):
    """`create_app(registry=None)` (what `manaproxy serve` does) adds process and platform collectors."""
    up = await make_upstream("a")
    config = parse_config(build_config({"a": up}, {"mana/x": ["a/m1"]}), env={})
    client = await aiohttp_client(create_app(config, registry=None, probes=False))
    assert (await client.post(CHAT, json=chat())).status == 200
    text = await (await client.get("/metrics")).text()
    assert "process_cpu_seconds_total" in text
    assert 'mana_llm_alias_resolved_total{alias="mana/x",target="a/m1"} 1.0' in text

    await assert_promtool_accepts(text)


async def test_every_series_the_seed_dashboard_reads_is_in_the_scrape(make_upstream, make_proxy):
    proxy = await varied_traffic(make_upstream, make_proxy)
    samples = [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(await scrape(proxy))
        for sample in family.samples
    ]

    def present(name: str, **labels: str) -> bool:
        return any(n == name and all(got.get(k) == v for k, v in labels.items()) for n, got in samples)

    def label_sets(name: str) -> set[frozenset[str]]:
        return {frozenset(labels) for n, labels in samples if n == name}

    assert label_sets("mana_llm_llm_requests_total") == {frozenset({"provider", "model", "streaming"})}
    assert label_sets("mana_llm_llm_errors_total") == {frozenset({"provider", "model", "error_type"})}
    assert label_sets("mana_llm_llm_latency_seconds_bucket") == {frozenset({"provider", "model", "le"})}
    assert label_sets("mana_llm_tokens_total") == {frozenset({"provider", "model", "type"})}
    for provider in ("ollama", "google"):
        for streaming in ("true", "false"):
            assert present("mana_llm_llm_requests_total", provider=provider, streaming=streaming)
        assert present("mana_llm_llm_latency_seconds_bucket", provider=provider, le="+Inf")
        for kind in ("prompt", "completion"):
            assert present("mana_llm_tokens_total", provider=provider, type=kind)
    assert present("mana_llm_llm_requests_total", provider="ollama", model="gemma3:4b")
    assert present("mana_llm_llm_requests_total", provider="google", model="gemini-2.0-flash")
    for error_type in ("model_not_found", "http_400", "upstream_error", "invalid_json"):
        assert present("mana_llm_llm_errors_total", error_type=error_type)
    # The new series the dashboard and alerts read.
    assert present("mana_llm_time_to_first_byte_seconds_bucket", provider="google", le="0.05")
    assert present("mana_llm_time_to_first_byte_seconds_bucket", provider="google", le="60.0")
    assert present("mana_llm_proxy_overhead_seconds_bucket", le="1e-05")
    assert present("mana_llm_stream_outcomes_total", provider="ollama", outcome="upstream_error")
    assert present("mana_llm_fallback_total", from_model="groq/llama-3.3-70b-versatile", reason="connect")
    assert present("mana_llm_fallback_total", from_model="openrouter/meta/llama-3.1-8b", reason="unconfigured")
    assert present("mana_llm_provider_healthy", provider="groq")
    assert present("mana_llm_requests_in_flight", provider="google")
    assert present("mana_llm_alias_healthy_targets", alias="mana/long-form")
    assert present("mana_llm_requests_total", endpoint="/v1/chat/completions", status="200")
    assert present("mana_llm_request_latency_seconds_bucket", endpoint="/v1/aliases")


def test_a_multiprocess_directory_in_the_environment_alone_changes_nothing(monkeypatch, tmp_path):
    """Only a worker of a supervisor (`MANAPROXY_WORKER` set beside it) reports the host from metric files: one
    process keeps its own registry, process metrics and scrape-time gauges, whatever else the environment holds."""
    from prometheus_client import CollectorRegistry, generate_latest

    from manaproxy.gateway import Gateway
    from manaproxy.metrics import instrument
    from manaproxy.reload import Reloader

    from .helpers import build_config

    config = parse_config(build_config({"up": "http://127.0.0.1:9/v1"}, {"mana/a": ["up/m1"]}), env={})
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    gateway = Gateway.for_config(config)
    single = instrument(gateway, Reloader(gateway))
    assert single.shared is None
    assert single.scrape_registry is single.registry
    text = generate_latest(single.registry).decode()
    assert "process_cpu_seconds_total" in text
    assert 'mana_llm_requests_in_flight{provider="up"} 0.0' in text

    monkeypatch.setenv("MANAPROXY_WORKER", "1")
    gateway = Gateway.for_config(config)
    worker = instrument(gateway, Reloader(gateway), CollectorRegistry())
    assert worker.shared is not None
    assert worker.scrape_registry is not worker.registry
    assert "process_cpu_seconds_total" not in generate_latest(worker.scrape_registry).decode()


async def test_a_client_leaving_after_the_usage_chunk_still_counts_its_tokens(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = sse_reply(chat_chunks("m1", ["a"], usage=(7, 3)), hang_after=4)  # usage sent, no [DONE] yet
    clients = {"clients": {"app": {"key": "${APP_KEY}"}}}
    config = build_config({"a": a}, {"mana/x": ["a/m1"]}) + yaml.safe_dump(clients, sort_keys=False)
    proxy = await make_proxy(config, env={"APP_KEY": "sk-app-0123456789"})

    headers = {"Authorization": "Bearer sk-app-0123456789"}
    body = chat(stream=True, stream_options={"include_usage": True})
    resp = await proxy.client.post(CHAT, json=body, headers=headers)
    seen = b""
    while b'"prompt_tokens"' not in seen:
        seen += await resp.content.readuntil(b"\n\n")
    resp.close()  # before the end of the stream

    await wait_for(lambda: exists(proxy, "mana_llm_stream_outcomes_total", provider="a", outcome="client_disconnected"))
    assert value(proxy, "mana_llm_tokens_total", provider="a", model="m1", type="prompt") == 7
    assert value(proxy, "mana_llm_tokens_total", provider="a", model="m1", type="completion") == 3
    labels = {"client": "app", "provider": "a", "model": "m1"}
    assert value(proxy, "mana_llm_client_tokens_total", **labels, type="prompt") == 7
    assert value(proxy, "mana_llm_client_tokens_total", **labels, type="completion") == 3
