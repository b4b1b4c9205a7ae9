"""The life of `manaproxy serve` under a service manager: built, ready (sd_notify), draining on SIGTERM or
SIGINT within its bound, deaf to SIGHUP once stopping. (Reloads on SIGHUP: test_reload.py; the command's
refusals and exit codes: test_cli.py.)

Fake upstreams run in the test's own loop; the process talks to them over loopback. Each test waits on
events (a `/health` answer, a log line, a datagram, a refused connection), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from manaproxy.app import create_app
from manaproxy.config import parse_config

from .fakes import (
    FakeUpstream,
    gated_stream,
)
from .helpers import CHAT, ProxyTestServer, build_config, chat
from .processes import next_datagram, read_datagrams

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


async def connection_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def wait_refused(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await connection_refused(port):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still accepts connections")
        await asyncio.sleep(0.01)


async def test_sigterm_lets_a_stream_in_flight_finish_and_exits_0(make_upstream, serve):
    up = await make_upstream("up")
    gate = asyncio.Event()
    up.default = gated_stream(gate)
    proxy = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}))

    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + CHAT, json=chat("mana/a", stream=True))
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert b'"model":"up/m1"' in first

        proxy.signal(signal.SIGTERM)
        await proxy.wait_line(lambda text: "stopping" in text)
        # New connections are refused while the stream is still being served.
        await wait_refused(proxy.port)
        assert proxy.proc is not None
        assert proxy.proc.returncode is None

        gate.set()
        rest = await resp.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert rest.count(b'"model":"up/m1"') == 3
    assert await proxy.wait_exit() == 0
    assert proxy.lines_with("stopped after draining")
    (line,) = proxy.lines_with("request_id=")
    assert "outcome=completed" in line


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
            resp = await session.post(proxy.url + CHAT, json=chat(stream=True))
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


async def test_readiness_notifications_reach_notify_socket(make_upstream, serve, tmp_path):
    up = await make_upstream("up")
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        good = build_config({"up": up}, {"mana/a": ["up/m1"]})
        proxy = await serve(good, wait=False, NOTIFY_SOCKET=str(path))
        ready = await next_datagram(sock)
        assert ready.splitlines()[0] == "READY=1"
        assert "STATUS=serving" in ready
        assert not await connection_refused(proxy.port)  # READY came once it was listening, not before
        await proxy.wait_healthy()
        assert read_datagrams(sock) == []

        await proxy.reload(build_config({"up": up}, {"mana/a": ["up/m1"], "mana/b": ["up/m2"]}))
        reloading = (await next_datagram(sock)).splitlines()
        assert reloading[0] == "RELOADING=1"
        assert reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].split("=")[1]) <= time.monotonic_ns() // 1000
        assert (await next_datagram(sock)).splitlines()[0] == "READY=1"

        await proxy.reload("providers: {")
        assert (await next_datagram(sock)).startswith("RELOADING=1\n")
        assert await next_datagram(sock) == "READY=1\nSTATUS=reload rejected; serving the previous config"

        proxy.signal(signal.SIGTERM)
        assert await next_datagram(sock) == "STOPPING=1"
        assert await proxy.wait_exit() == 0
        assert read_datagrams(sock) == []
    finally:
        sock.close()


# Put on the child's PYTHONPATH as sitecustomize.py: an audit hook that writes down every connect and send on
# an AF_UNIX socket, the only way an sd_notify datagram can leave, wherever it would go.
UNIX_SOCKET_AUDIT = """
import os, socket, sys

def _hook(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg") and args[0].family == socket.AF_UNIX:
        with open(os.environ["UNIX_SOCKET_AUDIT"], "a") as log:
            log.write(f"{event} {args[1]!r}\\n")

sys.addaudithook(_hook)
"""


async def test_without_notify_socket_nothing_is_sent_and_sigint_also_stops(make_upstream, serve, tmp_path):
    up: FakeUpstream = await make_upstream("up")
    config = build_config({"up": up}, {"mana/a": ["up/m1"]})
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(UNIX_SOCKET_AUDIT)
    python_path = os.pathsep.join(filter(None, [str(tmp_path / "audit"), os.environ.get("PYTHONPATH")]))
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        # The control: with $NOTIFY_SOCKET, the audit sees sd_notify's datagrams and they arrive.
        audit = tmp_path / "with.log"
        audit.touch()
        proxy = await serve(config, PYTHONPATH=python_path, UNIX_SOCKET_AUDIT=str(audit), NOTIFY_SOCKET=str(path))
        proxy.signal(signal.SIGINT)
        assert await proxy.wait_exit() == 0
        assert [message.splitlines()[0] for message in read_datagrams(sock)] == ["READY=1", "STOPPING=1"]
        assert audit.read_text().splitlines() == [f"socket.connect {str(path)!r}"] * 2

        audit = tmp_path / "without.log"
        audit.touch()
        proxy = await serve(config, PYTHONPATH=python_path, UNIX_SOCKET_AUDIT=str(audit))
        proxy.signal(signal.SIGINT)
        assert await proxy.wait_exit() == 0
        assert audit.read_text() == ""  # no datagram went anywhere
        assert read_datagrams(sock) == []
        assert not proxy.lines_with("sd_notify")
    finally:
        sock.close()


def test_an_app_created_before_the_event_loop_runs_serves_once_it_does():
    """`manaproxy serve` builds the application before it starts the loop that serves it."""
    config = parse_config(build_config({"a": "http://127.0.0.1:9/v1"}, {"mana/x": ["a/m1"]}), env={})
    app = create_app(config, probes=False)

    async def serve_once() -> tuple[int, Any]:
        async with TestClient(ProxyTestServer(app)) as client:
            resp = await client.get("/v1/aliases")
            return resp.status, await resp.json()

    status, body = asyncio.run(serve_once())

    assert status == 200
    assert [alias["chain"] for alias in body["aliases"]] == [["a/m1"]]
