"""Client connections are bounded in time and number of files: headers that trickle in, connections that
say nothing, idle keep-alive connections, and the open-files limit and listen backlog of the real process."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time

import orjson
import pytest

from manaproxy.server import default_max_connections

from .helpers import CHAT, build_config, chat, open_files_limit, raw_post, split_response

FAST = {"header_timeout_seconds": 0.5, "keepalive_timeout_seconds": 1.0}


@pytest.fixture
async def proxy(make_upstream, make_proxy):
    up = await make_upstream("up")
    return await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, server=FAST))


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[bytes, float]:
    """Everything until the server closes, and how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        data = await reader.read()
    return data, time.monotonic() - started


async def test_headers_that_trickle_in_get_a_408_and_the_connection_closes(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for n in range(100):  # a header line every 50 ms: the head never completes
            writer.write(b"X-Slow-%d: 1\r\n" % n)
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    answer, took = await read_all(reader)
    trickling.cancel()
    writer.close()

    status, headers, body = split_response(answer)
    assert status == 408
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "header_timeout"
    assert took < 2.5


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.server.port)

    answer, took = await read_all(reader)
    writer.close()

    assert split_response(answer)[0] == 408
    assert 0.4 < took < 2.0


async def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(proxy):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.server.port)
    request = raw_post(CHAT, orjson.dumps(chat())).replace(b"Connection: close", b"Connection: keep-alive")
    for _ in range(3):  # requests 0.7 s apart: beyond the head deadline, within the keep-alive one
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(split_response(head + b"")[1]["content-length"])
        await reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.7)

    rest, took = await read_all(reader)  # idle past keepalive_timeout_seconds: closed, nothing sent
    writer.close()

    assert rest == b""
    assert took < 2.5


async def test_the_header_deadline_holds_for_the_next_request_on_a_kept_alive_connection(make_upstream, make_proxy):
    up = await make_upstream("up")
    # keep-alive far longer than the header deadline: only the deadline can close this connection in time
    server = {"header_timeout_seconds": 0.5, "keepalive_timeout_seconds": 4.0}
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, server=server))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.client.server.port)
    request = raw_post(CHAT, orjson.dumps(chat())).replace(b"Connection: close", b"Connection: keep-alive")
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(split_response(head)[1]["content-length"]))
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # the second head never completes

    async def trickle() -> None:
        for n in range(100):
            writer.write(b"X-Slow-%d: 1\r\n" % n)
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        answer, took = await read_all(reader, timeout=3.5)
    finally:
        trickling.cancel()
        writer.close()

    assert split_response(answer)[0] == 408
    assert took < 3.0


async def test_many_trickling_clients_do_not_hold_the_server(proxy):
    port = proxy.client.server.port
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
    for _, writer in connections:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")

    resp = await proxy.client.post(CHAT, json=chat())  # served meanwhile
    answers = await asyncio.gather(*(read_all(reader) for reader, _ in connections))
    for _, writer in connections:
        writer.close()

    assert resp.status == 200
    assert {split_response(answer)[0] for answer, _ in answers} == {408}


async def test_the_real_process_lifts_its_open_files_limit_to_the_hard_one(make_upstream, serve):
    up = await make_upstream("up")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Lowered for the child to inherit, yet above what this test process holds open (a pytest worker that ran
    # other files may hold many): the child must start below its hard limit and lift itself to it.
    lowered = max(1024, len(os.listdir("/proc/self/fd")) + 512)
    if hard < 2 * lowered:
        pytest.skip("the hard open-files limit is too low to lower the soft one below it")
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))  # inherited by the child
    try:
        process = await serve(build_config({"a": up}, {"mana/x": ["a/m1"]}))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert process.proc is not None

    assert open_files_limit(process.proc.pid) == (str(hard), str(hard))
    assert f"up to {hard} open files" in (await process.wait_line(lambda text: "listening on" in text))


async def test_the_real_process_listens_with_the_configured_backlog(make_upstream, serve):
    up = await make_upstream("up")
    process = await serve(build_config({"a": up}, {"mana/x": ["a/m1"]}, server={"listen_backlog": 77}))

    # `ss` shows a listening socket's backlog as its Send-Q.
    ss = await asyncio.create_subprocess_exec(
        "ss", "-ltnH", f"sport = :{process.port}", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out, _ = await ss.communicate()
    state, _recv_q, send_q, *_ = out.decode().split()
    assert state == "LISTEN"
    assert send_q == "77"


async def test_past_max_connections_the_longest_idle_keep_alive_connection_is_closed_and_a_request_served(
    make_upstream, make_proxy
):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, server={"max_connections": 20}))
    request = raw_post(CHAT, orjson.dumps(chat())).replace(b"Connection: close", b"Connection: keep-alive")
    idle = []
    for _ in range(20):  # each asks once and stays open, idle, as keep-alive clients do
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(split_response(head)[1]["content-length"]))
        idle.append((reader, writer))

    resp = await proxy.client.post(CHAT, json=chat())  # the 21st connection

    assert resp.status == 200
    oldest, rest = idle[0], idle[1:]
    assert (await read_all(oldest[0], timeout=2.0))[0] == b""  # closed, nothing sent
    for reader, writer in rest:  # still open and still served
        writer.write(request)
        async with asyncio.timeout(5):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.close()
    oldest[1].close()


async def test_past_max_connections_with_none_idle_a_new_connection_gets_a_503_at_once(make_upstream, make_proxy):
    up = await make_upstream("up")
    proxy = await make_proxy(build_config({"a": up}, {"mana/x": ["a/m1"]}, server={"max_connections": 5}))
    busy = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(5)]  # no request yet: not idle

    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(raw_post(CHAT, orjson.dumps(chat())))
    answer, took = await read_all(reader, timeout=3.0)
    writer.close()
    for _, each in busy:
        each.close()

    status, headers, body = split_response(answer)
    assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
    assert orjson.loads(body)["error"]["code"] == "too_many_connections"
    assert took < 1.5
    assert up.calls == 0


@pytest.mark.parametrize(("open_files", "expected"), [(1024, 448), (4096, 1984), (100, 16), (-1, 1_000_000)])
def test_the_default_connection_cap_leaves_headroom_and_two_files_per_stream(open_files, expected):
    assert default_max_connections(open_files) == expected
