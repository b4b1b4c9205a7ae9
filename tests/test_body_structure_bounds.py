"""A small upload cannot become a huge structure (issue 14, items 7 and 12): a JSON body's nesting and
number of values (`server.max_json_depth`, `server.max_json_items`) and a form's parts
(`server.max_form_parts`) are bounded by counting bytes before anything decodes or walks the body, and a
large body is parsed off the event loop: `/health` keeps answering while such bodies arrive."""

from __future__ import annotations

import asyncio
import gzip
import io
import time

import orjson

from .fakes import json_reply
from .helpers import CHAT, assert_openai_error, build_config

GZIP = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
# Four bodies of ~30 MB inflated at once: more than one client's default share of the body budget.
ROOMY = {"max_inflight_body_bytes_per_client": 256 * 1024 * 1024}


def empty_arrays(count: int) -> bytes:
    # A nested `model` with the same value: the bytes cannot tell which is the top-level one, so the body
    # used to be decoded and re-encoded whole (~1 GB for this one) on the loop.
    return b'{"model": "mana/x", "meta": {"model": "mana/x"}, "messages": [' + b",".join([b"[]"] * count) + b"]}"


async def _health_while(proxy, requests) -> tuple[list, float]:
    """Run `requests` (coroutines) at once, polling `/health` meanwhile: their results, and the slowest
    `/health` answer seen."""
    slowest = 0.0
    tasks = [asyncio.ensure_future(request) for request in requests]
    while not all(task.done() for task in tasks):
        started = time.perf_counter()
        resp = await proxy.client.get("/health")
        assert resp.status == 200
        slowest = max(slowest, time.perf_counter() - started)
        await asyncio.sleep(0.01)
    return [task.result() for task in tasks], slowest


async def test_a_gzip_of_millions_of_empty_arrays_is_refused_without_blocking_the_loop(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server=ROOMY))
    bomb = gzip.compress(empty_arrays(10_000_000), 9)  # ~30 KiB on the wire, 30 MB inflated
    assert len(bomb) < 64 * 1024

    async def send() -> tuple[int, dict]:
        resp = await proxy.client.post(CHAT, data=bomb, headers=GZIP)
        return resp.status, await resp.json()

    started = time.perf_counter()
    results, slowest = await _health_while(proxy, [send() for _ in range(4)])

    for status, body in results:
        assert (status, body["error"]["code"]) == (413, "json_too_many_items")
    assert a.calls == 0
    # Before: a full decode of each (1 GB) on the loop, /health waited ~7 s behind them; now ~0.1 s.
    assert time.perf_counter() - started < 8
    assert slowest < 1.0, slowest


async def test_the_structure_limits_are_settings(make_upstream, make_proxy):
    a = await make_upstream("a")
    server = {"max_json_depth": 4, "max_json_items": 50}
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server=server))

    deep = await proxy.client.post(CHAT, json={"model": "mana/x", "messages": [[[[["x"]]]]]})
    await assert_openai_error(deep, 400, "json_too_deep")
    many = await proxy.client.post(CHAT, json={"model": "mana/x", "messages": list(range(60))})
    await assert_openai_error(many, 413, "json_too_many_items")
    # Brackets and commas inside strings are text, not structure.
    text = {"model": "mana/x", "messages": [{"role": "user", "content": "[[[[[{{{{" + ',\\"' * 200}]}
    ok = await proxy.client.post(CHAT, json=text)
    assert ok.status == 200, await ok.text()
    assert orjson.loads(a.requests[0].body)["messages"] == text["messages"]
    assert a.calls == 1


async def test_a_large_body_within_the_limits_is_parsed_off_the_loop_and_sent_intact(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = json_reply({"object": "list", "data": []})
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}))
    # A nested `model` with the same value and an escaped top-level key: the one body re-encoded.
    body = {"mod\u0065l": "mana/x", "input": [[i, i + 1] for i in range(40_000)], "meta": {"model": "mana/x"}}
    raw = orjson.dumps(body).replace(b'"model":"mana/x","input"', b'"mod\\u0065l":"mana/x","input"')
    assert raw.startswith(b'{"mod\\u0065l"')

    resp = await proxy.client.post("/v1/embeddings", data=io.BytesIO(raw), headers={"Content-Type": "application/json"})

    assert resp.status == 200, await resp.text()
    sent = orjson.loads(a.requests[0].body)
    assert (sent["model"], sent["meta"]) == ("m1", {"model": "mana/x"})
    assert sent["input"] == body["input"]


def tiny_parts(count: int) -> bytes:
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    return b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nmana/x\r\n' + part * count + b"--b--\r\n"


async def test_a_form_of_many_tiny_parts_is_refused_before_it_is_walked(make_upstream, make_proxy):
    a = await make_upstream("a")
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server=ROOMY))
    bomb = gzip.compress(tiny_parts(600_000), 9)
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Encoding": "gzip"}

    async def send() -> tuple[int, dict]:
        resp = await proxy.client.post("/v1/audio/transcriptions", data=bomb, headers=headers)
        return resp.status, await resp.json()

    results, slowest = await _health_while(proxy, [send() for _ in range(4)])

    for status, body in results:
        assert (status, body["error"]["code"]) == (413, "too_many_form_parts")
    assert a.calls == 0
    assert slowest < 1.0, slowest


async def test_the_part_limit_is_a_setting(make_upstream, make_proxy):
    a = await make_upstream("a")
    a.default = json_reply({"text": "ok"})
    proxy = await make_proxy(build_config({"a": a}, {"mana/x": ["a/m1"]}, server={"max_form_parts": 4}))
    headers = {"Content-Type": "multipart/form-data; boundary=b"}

    within = await proxy.client.post("/v1/audio/transcriptions", data=tiny_parts(3), headers=headers)
    assert within.status == 200, await within.text()
    past = await proxy.client.post("/v1/audio/transcriptions", data=tiny_parts(4), headers=headers)
    await assert_openai_error(past, 413, "too_many_form_parts")
    assert a.calls == 1
