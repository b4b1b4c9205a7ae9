"""`server.workers: 2`: one supervisor, two worker processes on one port (supervisor.py, hostmetrics.py).

A real `manaproxy serve` child; requests go over many short connections so that the kernel's SO_REUSEPORT
spread reaches both workers (each worker's log lines carry its `pid=`). What one process does alone is
tested in test_lifecycle.py and test_reload.py; here: the counts of the whole host, a worker killed and
restarted, SIGHUP and SIGTERM through the supervisor, and the sd_notify datagrams only it sends.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .fakes import chat_completion, gated_stream, json_reply, status_reply
from .helpers import CHAT, build_config, chat
from .processes import ServeProcess, next_datagram, read_datagrams

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreading, POSIX signals")

TWO = {"workers": 2, "shutdown_timeout_seconds": 5}


async def started(proxy: ServeProcess) -> list[int]:
    """Wait for the supervisor's line that every worker listens; the workers' pids."""
    line = await proxy.wait_line(lambda text: "manaproxy.supervisor: listening on" in text, timeout=15)
    match = re.search(r"pids ([\d, ]+);", line)
    assert match is not None, line
    return [int(pid) for pid in match.group(1).split(", ")]


async def spread(proxy: ServeProcess, count: int, model: str = "mana/a") -> list[int]:
    """`count` chat requests, each on a new connection, 16 at a time; their statuses."""
    statuses: list[int] = []
    limit = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession) -> None:
        async with limit, session.post(proxy.url + CHAT, json=chat(model)) as resp:
            await resp.read()
            statuses.append(resp.status)

    connector = aiohttp.TCPConnector(force_close=True)  # a new source port each time: the kernel's hash spreads them
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(count)))
    return statuses


async def counted(proxy: ServeProcess) -> dict[str, float]:
    """A scrape of `/metrics`: the host's chat requests (HTTP and LLM counters) and the in-flight gauge."""
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as resp:
        text = await resp.text()
    found = {"http": 0.0, "llm": 0.0, "in_flight": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mana_llm_requests_total" and sample.labels["endpoint"] == CHAT:
                found["http"] += sample.value
            elif sample.name == "mana_llm_llm_requests_total":
                found["llm"] += sample.value
            elif sample.name == "mana_llm_requests_in_flight":
                found["in_flight"] += sample.value
    return found


async def settled(proxy: ServeProcess) -> dict[str, float]:
    """`counted` once the in-flight gauge is back to 0: each worker publishes it every second (hostmetrics.py)."""
    for _ in range(40):
        found = await counted(proxy)
        if found["in_flight"] == 0:
            return found
        await asyncio.sleep(0.1)
    return found


def request_pids(proxy: ServeProcess) -> set[int]:
    return {int(m.group(1)) for line in proxy.lines_with("request_id=") if (m := re.search(r"pid=(\d+)", line))}


async def test_requests_spread_over_workers_are_counted_exactly_once(make_upstream, serve):
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("m1"))
    proxy = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server=TWO), wait=False)
    pids = await started(proxy)
    assert len(set(pids)) == 2

    assert await spread(proxy, 120) == [200] * 120
    await proxy.wait_line(lambda _: len(proxy.lines_with("request_id=")) == 120)
    assert request_pids(proxy) == set(pids)  # both workers answered some
    assert await settled(proxy) == {"http": 120, "llm": 120, "in_flight": 0}
    for _ in range(4):  # whichever worker a scrape reaches, it reports the host
        assert await counted(proxy) == {"http": 120, "llm": 120, "in_flight": 0}
    async with aiohttp.ClientSession() as session:  # the views are the answering worker's: it says which
        for _ in range(4):
            async with session.get(proxy.url + "/v1/health") as resp:
                process = (await resp.json())["process"]
            assert process["worker"] in (1, 2)  # workers are numbered from 1
            assert process["pid"] in pids
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait_exit() == 0


async def test_a_killed_worker_is_restarted_and_no_count_goes_backwards(make_upstream, serve):
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("m1"))
    proxy = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server=TWO), wait=False)
    pids = await started(proxy)
    assert await spread(proxy, 40) == [200] * 40
    await proxy.wait_line(lambda _: len(proxy.lines_with("request_id=")) == 40)

    os.kill(pids[0], signal.SIGKILL)
    await proxy.wait_line(lambda text: f"(pid {pids[0]}) was killed by SIGKILL" in text and "restarting it in" in text)
    line = await proxy.wait_line(lambda text: "restarted: pid" in text, timeout=10)
    new_pid = int(re.search(r"pid (\d+) listening", line).group(1))  # type: ignore[union-attr]
    assert new_pid not in pids

    assert (await counted(proxy))["http"] == 40  # the dead worker's counts stay in the sums
    assert await spread(proxy, 40) == [200] * 40
    await proxy.wait_line(lambda _: len(proxy.lines_with("request_id=")) == 80)
    assert new_pid in request_pids(proxy)
    assert await settled(proxy) == {"http": 80, "llm": 80, "in_flight": 0}
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait_exit() == 0


async def test_sighup_reloads_every_worker_reported_once_and_systemd_hears_the_supervisor_only(
    make_upstream, serve, tmp_path
):
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("m1"))
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        proxy = await serve(
            build_config({"up": up}, {"mana/a": ["up/m1"]}, server=TWO), wait=False, NOTIFY_SOCKET=str(path)
        )
        ready = await next_datagram(sock, timeout=15)
        assert ready.splitlines()[0] == "READY=1"
        assert ready.endswith("aliases.yaml: 1 providers (1 configured), 1 aliases, default - with 2 workers")
        pids = await started(proxy)  # logged before READY=1 was sent: every worker listened by then

        proxy.config_path.write_text(build_config({"up": up}, {"mana/a": ["up/m1"], "mana/b": ["up/m2"]}, server=TWO))
        proxy.signal(signal.SIGHUP)
        assert (await next_datagram(sock)).startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert (await next_datagram(sock)).splitlines()[0] == "READY=1"
        report = await proxy.wait_line(lambda text: "reload done in all 2 workers" in text)
        for pid in pids:
            assert f"(pid {pid}) success" in report
            await proxy.wait_line(lambda text, pid=pid: f"pid={pid} reloaded " in text)
        assert await spread(proxy, 30, "mana/b") == [200] * 30  # every worker serves the new alias

        proxy.config_path.write_text("providers: {")
        proxy.signal(signal.SIGHUP)
        assert (await next_datagram(sock)).startswith("RELOADING=1\n")
        assert await next_datagram(sock) == "READY=1\nSTATUS=reload rejected; serving the previous config"
        failed = await proxy.wait_line(lambda text: "reload failed in 2 of 2 workers" in text)
        assert failed.count(" failure") == 2
        assert await spread(proxy, 10, "mana/b") == [200] * 10

        proxy.signal(signal.SIGTERM)
        assert await next_datagram(sock) == "STOPPING=1"
        assert await proxy.wait_exit() == 0
        assert read_datagrams(sock) == []  # no worker ever sent one
        assert len(proxy.lines_with("reload done in all")) == 1
    finally:
        sock.close()


async def test_sigterm_drains_every_worker_and_a_stream_in_flight_finishes(make_upstream, serve):
    up = await make_upstream("up")
    gate = asyncio.Event()
    up.default = gated_stream(gate)
    proxy = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server=TWO), wait=False)
    pids = await started(proxy)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(proxy.url + CHAT, json=chat("mana/a", stream=True))
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")

        proxy.signal(signal.SIGTERM)
        for pid in pids:
            await proxy.wait_line(lambda text, pid=pid: f"pid={pid} stopping: no new connections" in text)
        assert proxy.proc is not None
        assert proxy.proc.returncode is None  # the supervisor waits for the stream's worker

        gate.set()
        rest = await resp.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert await proxy.wait_exit() == 0
    assert proxy.lines_with("stopped: all workers drained")
    assert len(proxy.lines_with("stopped after draining")) == 2


async def test_a_worker_that_cannot_listen_stops_the_start_with_exit_1(make_upstream, tmp_path):
    up = await make_upstream("up")
    config = tmp_path / "aliases.yaml"
    config.write_text(build_config({"up": up}, {"mana/a": ["up/m1"]}, server=TWO))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "PORT")}
    proxy = ServeProcess(config, env, cwd=tmp_path)
    with socket.socket() as taken:  # the port, held without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", proxy.port))
        taken.listen()
        await proxy.start(wait=False)
        assert await proxy.wait_exit(timeout=15) == 1
    assert proxy.lines_with("before listening: stopping")
    assert len(proxy.lines_with("cannot listen on")) >= 1


async def test_workers_whose_supervisor_is_killed_drain_and_exit(make_upstream, serve):
    up = await make_upstream("up")
    up.default = json_reply(chat_completion("m1"))
    proxy = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server=TWO), wait=False)
    pids = await started(proxy)
    proxy.signal(signal.SIGKILL)  # no forwarded SIGTERM: each worker learns it from its link
    for pid in pids:
        await proxy.wait_line(lambda text, pid=pid: f"pid={pid} stopped after draining" in text)
    assert len(proxy.lines_with("the supervisor is gone: stopping")) == 2


async def test_auto_starts_one_worker_per_cpu_the_process_may_use(make_upstream, serve):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one usable CPU: `auto` is one process")
    up = await make_upstream("up")
    mine = set(cpus)
    os.sched_setaffinity(0, set(cpus[:2]))  # the child inherits it: `auto` must count 2, however big the machine
    try:
        proxy = await serve(build_config({"up": up}, {"mana/a": ["up/m1"]}, server={"workers": "auto"}), wait=False)
    finally:
        os.sched_setaffinity(0, mine)
    assert len(await started(proxy)) == 2
    assert proxy.lines_with("with 2 workers")
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait_exit() == 0


async def test_breaker_news_is_counted_for_the_host(make_upstream, serve, redis_server):
    """`mana_llm_health_news_total` is reported at scrape time by the shared health of each worker: with
    workers it reaches `/metrics` through the metric files, like every other scrape-time series."""
    dead, spare = await make_upstream("d"), await make_upstream("u")
    dead.default = status_reply(503)
    spare.default = json_reply(chat_completion("m1"))
    health = {"failure_threshold": 2, "backoff_seconds": 60, "probe_interval_seconds": 300, "shared": True}
    raw = yaml.safe_load(build_config({"d": dead, "u": spare}, {"mana/a": ["d/m1", "u/m1"]}, health=health, server=TWO))
    raw["redis"] = {"url": redis_server.url, "timeout_seconds": 0.5}
    proxy = await serve(yaml.safe_dump(raw), wait=False)
    await started(proxy)
    assert await spread(proxy, 20) == [200] * 20  # each worker's breaker for d opens: news sent

    async def sent() -> float:
        async with aiohttp.ClientSession() as session, session.get(proxy.url + "/metrics") as resp:
            text = await resp.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "mana_llm_health_news_total" and sample.labels["direction"] == "sent"
        )

    for _ in range(40):  # each worker publishes its scrape-time series every second (hostmetrics.py)
        if await sent() >= 1:
            break
        await asyncio.sleep(0.1)
    assert await sent() >= 1
    proxy.signal(signal.SIGTERM)
    assert await proxy.wait_exit() == 0
