"""What the status page reads, over HTTP: `/v1/failures` (the last failed or fallen-back requests, bounded, no
text of any prompt), the `/v1/events` stream (transitions, failures, reloads; a client limit; slow readers
dropped; ended at shutdown), `/v1/health`'s `since_unix`, `process` and `reloads`, and `server.status_page`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import ClientResponse

from manaproxy.record import Attempt, RequestRecord
from manaproxy.routing import Target
from manaproxy.views.events import EVENTS, QUEUE_EVENTS
from manaproxy.views.failures import CAPACITY, RecentFailures

from .fakes import chat_answer, closed_port_url, status_reply, wait_for
from .helpers import CHAT, assert_openai_error, build_config, chat

SECRET_WORDS = "the-prompt-nobody-may-see"


def incident_config(up: Any, **server: Any) -> str:
    """mana/x = [down/m0 (nothing listens), up/m1]; breakers open at the first failure."""
    return build_config(
        {"down": closed_port_url(), "up": up},
        {"mana/x": ["down/m0", "up/m1"], "mana/solo": ["up/m2"]},
        health={"failure_threshold": 1},
        server=server or None,
    )


async def read_events(resp: ClientResponse, count: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
    """The next `count` events of an SSE stream, as (kind, decoded data)."""
    events: list[tuple[str, Any]] = []
    buffer = b""
    async with asyncio.timeout(timeout):
        while len(events) < count:
            chunk = await resp.content.readany()
            assert chunk, f"the stream ended after {events}"
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                lines = dict(
                    line.split(b": ", 1) for line in block.split(b"\n") if line.startswith((b"event", b"data"))
                )
                if b"event" in lines:
                    events.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return events


async def test_failures_lists_failed_and_fallen_back_requests_newest_first_without_text(make_upstream, make_proxy):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    proxy = await make_proxy(incident_config(up), api_keys=[b"key-zero-123456", b"key-one-1234567"])
    auth = {"Authorization": "Bearer key-one-1234567"}
    body = {"model": "mana/x", "messages": [{"role": "user", "content": SECRET_WORDS}]}
    fallback = await proxy.client.post(CHAT, json=body, headers={**auth, "X-Request-ID": "req-fallback"})
    assert fallback.status == 200
    up.queue(status_reply(500, f"model crashed on {SECRET_WORDS}"))
    failed = await proxy.client.post(
        CHAT, json={**body, "model": "mana/solo"}, headers={**auth, "X-Request-ID": "req-500"}
    )
    assert failed.status == 500
    fine = await proxy.client.post(CHAT, json={**body, "model": "up/m3"}, headers=auth)  # not listed
    assert fine.status == 200
    refused = await proxy.client.post(CHAT, data=b"{not json", headers=auth)  # the caller's error: not listed
    assert refused.status == 400

    resp = await proxy.client.get("/v1/failures", headers=auth)
    assert resp.status == 200
    text = await resp.text()
    assert SECRET_WORDS not in text
    document = orjson.loads(text)
    assert document["capacity"] == CAPACITY
    newest, oldest = document["failures"]
    assert [newest["request_id"], oldest["request_id"]] == ["req-500", "req-fallback"]
    assert oldest["time_unix"] <= newest["time_unix"] <= time.time()
    assert {key: value for key, value in oldest.items() if key not in ("time_unix", "duration_seconds")} == {
        "request_id": "req-fallback",
        "client": "key-2",
        "endpoint": CHAT,
        "model": "mana/x",
        "alias": "mana/x",
        "resolved": "up/m1",
        "attempts": [{"target": "down/m0", "reason": "connect", "tried": True, "status": None, "retry_after": None}],
        "status": 200,
        "error": None,
        "outcome": None,
        "stream": False,
    }
    assert newest["status"] == 500
    assert newest["attempts"] == [
        {"target": "up/m2", "reason": "http_500", "tried": True, "status": 500, "retry_after": None}
    ]
    assert (await proxy.client.get("/v1/failures")).status == 401


def test_the_ring_keeps_the_last_100() -> None:
    recent = RecentFailures()
    for number in range(CAPACITY + 50):
        record = RequestRecord(request_id=f"r{number}", endpoint=CHAT, status=503)
        record.attempts.append(Attempt.skipped(Target("a", "m"), "unhealthy", 5.0))
        recent.observe(record)
    assert len(recent.items) == CAPACITY
    assert [recent.items[0]["request_id"], recent.items[-1]["request_id"]] == ["r50", f"r{CAPACITY + 49}"]
    hedged = RequestRecord(request_id="won-race", endpoint=CHAT, status=200)
    hedged.attempts.append(Attempt(Target("a", "m"), "hedged_lost"))
    recent.observe(hedged)  # a hedge that lost its race is no failure
    assert recent.items[-1]["request_id"] != "won-race"


async def test_transitions_failures_and_reloads_arrive_as_events(make_upstream, make_proxy, tmp_path: Path):
    up = await make_upstream("up")
    up.default = chat_answer("m1")
    proxy = await make_proxy(incident_config(up))
    stream = await proxy.client.get("/v1/events")
    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"

    assert (await proxy.client.post(CHAT, json=chat("mana/x"), headers={"X-Request-ID": "req-1"})).status == 200
    (transition, t_data), (failure, f_data) = await read_events(stream, 2)
    assert (transition, t_data["provider"], t_data["status"]) == ("transition", "down", "unhealthy")
    assert (failure, f_data["request_id"], f_data["attempts"][0]["reason"]) == ("failure", "req-1", "connect")

    assert not proxy.reload_to(tmp_path, "providers: [oops\n")
    [(kind, data)] = await read_events(stream, 1)
    assert (kind, data["result"]) == ("reload", "failure")
    assert "aliases.yaml: line 2" in data["error"]
    assert proxy.reload_to(tmp_path, incident_config(up))  # `down` points elsewhere now: a fresh start
    (transition, t_data), (kind, data) = await read_events(stream, 2)
    assert (transition, t_data["provider"], t_data["status"]) == ("transition", "down", "healthy")
    assert (kind, data["result"], data["error"]) == ("reload", "success", None)

    health = await (await proxy.client.get("/v1/health")).json()
    assert [reload["result"] for reload in health["reloads"]] == ["success", "failure"]
    assert health["providers"]["down"]["since_unix"] is None  # its record was reset by the reload
    assert health["providers"]["up"]["since_unix"] is None
    assert health["process"]["config"] == str(tmp_path / "aliases.yaml")
    assert health["process"]["uptime_seconds"] >= 0
    assert (health["process"]["pid"], health["process"]["worker"]) == (os.getpid(), None)  # one process: no worker
    stream.close()


async def test_a_client_limit_on_streams(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(incident_config(up, max_event_clients=1))
    first = await proxy.client.get("/v1/events")
    assert first.status == 200
    second = await proxy.client.get("/v1/events")
    await assert_openai_error(second, 503, "too_many_event_clients")
    assert second.headers["Retry-After"] == "10"
    first.close()
    hub = proxy.app[EVENTS]
    await wait_for(lambda: not hub.subscribers)
    third = await proxy.client.get("/v1/events")
    assert third.status == 200
    third.close()


async def test_a_reader_too_slow_is_dropped_and_a_fast_one_kept(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(incident_config(up))
    hub = proxy.app[EVENTS]
    fast = await proxy.client.get("/v1/events")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    slow.setblocking(False)
    await asyncio.get_running_loop().sock_connect(slow, ("127.0.0.1", proxy.port))
    await asyncio.get_running_loop().sock_sendall(slow, b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: len(hub.subscribers) == 2)

    item = {"request_id": "r" * 32, "attempts": [{"target": "down/m0", "reason": "connect"}] * 4, "pad": "x" * 400}
    received = asyncio.create_task(read_events(fast, 2 * QUEUE_EVENTS, timeout=20))
    published = 0
    while not hub.dropped and published < 200_000:
        for _ in range(100):  # bursts smaller than a queue: a reader that keeps up keeps up
            hub.publish("failure", item)
        published += 100
        await asyncio.sleep(0)
    assert hub.dropped == 1
    assert len(hub.subscribers) == 1  # the fast one
    assert published > 2 * QUEUE_EVENTS
    assert len(await received) >= 2 * QUEUE_EVENTS  # more than its queue holds: it kept up
    with slow:
        await wait_for(lambda: _closed_by_peer(slow))  # its connection was aborted
    fast.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Drain what the socket holds; True once the peer closed it (reset or EOF)."""
    try:
        while chunk := sock.recv(65536):
            del chunk
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_open_streams_do_not_hold_the_shutdown_drain(make_upstream, serve):
    up = await make_upstream("up")
    process = await serve(incident_config(up))
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    writer.write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"manaproxy events")
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0
    assert time.monotonic() - started < 2  # not the straggler timeout, nor the 30 s drain
    async with asyncio.timeout(2):
        await reader.read()  # the stream ended
    writer.close()


async def test_status_page_off(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(incident_config(up, status_page=False))
    await assert_openai_error(await proxy.client.get("/status"), 404, "not_found")
    await assert_openai_error(await proxy.client.get("/v1/events"), 404, "not_found")
    assert (await proxy.client.get("/v1/failures")).status == 200


async def test_the_page_needs_no_key_and_holds_no_data(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(incident_config(up), api_keys=[b"key-zero-123456"])
    page = await proxy.client.get("/status")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    html = await page.text()
    assert '<meta name="manaproxy-auth" content="on">' in html
    for name in ("mana/x", "down/m0", "up/m1", "key-zero"):
        assert name not in html
    csp = dict(part.split(" ", 1) for part in page.headers["Content-Security-Policy"].split("; "))
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert csp["script-src"].startswith("'sha256-")
    assert (await proxy.client.get("/v1/events")).status == 401
    assert (await proxy.client.get("/v1/failures")).status == 401


async def test_the_page_asks_for_a_key_whenever_clients_are_declared_and_a_reload_can_change_it(
    make_upstream, make_proxy, tmp_path: Path
):
    up = await make_upstream("up")
    text = incident_config(up)
    with_clients = text + yaml.safe_dump({"clients": {"ops": {"key": "key-ops-1234567"}}})
    proxy = await make_proxy(with_clients)  # no MANAPROXY_API_KEYS: the clients come from the config alone

    assert '<meta name="manaproxy-auth" content="on">' in await (await proxy.client.get("/status")).text()
    assert proxy.reload_to(tmp_path, text)  # clients gone: auth off
    assert '<meta name="manaproxy-auth" content="off">' in await (await proxy.client.get("/status")).text()
