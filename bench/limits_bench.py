"""What a named client costs per request: finding its key, checking and counting its limits (memory backend,
and the Redis backend when `redis-server` is installed), counting an answer's tokens and writing the
x-ratelimit-* headers.

`.venv/bin/python -m bench.limits_bench [--iterations N] [--clients N]` (from the checkout's root, so that its own
`manaproxy` is imported) prints microseconds per operation (best of
5 rounds), each step as the request path runs it, in one event loop. Standalone: no server, no network; the
end-to-end cost is these steps plus nothing (the limiter's state is one dict lookup per rule). The Redis rows
start a `redis-server` of their own (unix socket and loopback TCP, no persistence) and time `admit` through
manaproxy's own Redis link: one EVALSHA round trip per admitted request, sequential (latency, not throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable

from manaproxy.clients import ClientTable, parse_env_clients
from manaproxy.config import ClientSpec, LimitSettings, RedisSettings
from manaproxy.limits import Limiter, MemoryBackend, headers_of
from manaproxy.redislimits import RedisBackend
from manaproxy.redislink import RedisLink


def best_of(rounds: int, iterations: int, step: Callable[[int], object]) -> float:
    """Microseconds per call of `step(i)`, the best of `rounds` rounds."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for index in range(iterations):
            step(index)
        best = min(best, time.perf_counter() - started)
    return best / iterations * 1e6


async def best_of_async(rounds: int, iterations: int, step: Callable[[int], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for index in range(iterations):
            await step(index)
        best = min(best, time.perf_counter() - started)
    return best / iterations * 1e6


async def main(iterations: int, clients: int) -> None:
    entries = [f"app-{n}:sk-app-{n:04d}-0123456789abcdef0123456789abcdef" for n in range(clients)]
    table = ClientTable(parse_env_clients(entries))
    keys = [entry.partition(":")[2].encode() for entry in entries]
    limited = [
        ClientSpec(f"app-{n}", requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**13)
        for n in range(clients)
    ]
    rpm_only = [ClientSpec(f"app-{n}", requests_per_minute=10**9) for n in range(clients)]
    unlimited = ClientSpec("free")
    limiter = Limiter(MemoryBackend(), LimitSettings())
    verdict = await limiter.admit(limited[0])
    assert verdict is not None

    rows = [
        (
            "identify a key (sha256 + compare_digest)",
            best_of(5, iterations, lambda i: table.identify([keys[i % clients]])),
        ),
        ("identify a wrong key", best_of(5, iterations, lambda i: table.identify([b"sk-nobody-0123456789abcdef"]))),
        ("admit: no limits", await best_of_async(5, iterations, lambda i: limiter.admit(unlimited))),
        (
            "admit: requests_per_minute",
            await best_of_async(5, iterations, lambda i: limiter.admit(rpm_only[i % clients])),
        ),
        ("admit: rpm + tpm + tpd", await best_of_async(5, iterations, lambda i: limiter.admit(limited[i % clients]))),
        (
            "spend an answer's tokens (tpm + tpd)",
            best_of(5, iterations, lambda i: limiter.spend(limited[i % clients], 40)),
        ),
        ("x-ratelimit-* headers (both trios)", best_of(5, iterations, lambda i: headers_of(verdict))),
    ]
    rows += await redis_rows(limited, min(iterations, 20_000))
    print(f"{clients} clients, {iterations} iterations, best of 5 (µs per operation)")
    for name, micros in rows:
        print(f"  {name:<42} {micros:7.2f}")
    per_request = rows[0][1] + rows[4][1] + rows[5][1] + rows[6][1]
    print(f"  {'a limited request, all of it':<42} {per_request:7.2f}")


def start_redis(binary: str, directory: str) -> tuple[subprocess.Popen[bytes], list[tuple[str, str]]]:
    """A redis-server on a unix socket and a loopback port; its (name, url) pairs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = f"{directory}/redis.sock"
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--unixsocket", sock]
    argv += ["--save", "", "--appendonly", "no", "--dir", directory]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    return server, [("unix socket", f"unix://{sock}"), ("TCP", f"redis://127.0.0.1:{port}/0")]


async def redis_rows(limited: list[ClientSpec], iterations: int) -> list[tuple[str, float]]:
    """`admit` with `limits: {backend: redis}` against a redis-server of its own; none when it is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed: no Redis rows")
        return []
    directory = tempfile.mkdtemp(prefix="mp-limits-bench-")  # a unix socket path must stay short
    server, urls = start_redis(binary, directory)
    rows = []
    try:
        for name, url in urls:
            link = RedisLink()
            link.open(RedisSettings(url=url, timeout_seconds=1.0))
            limiter = Limiter(MemoryBackend(), LimitSettings(backend="redis"), shared=RedisBackend(link))
            for _ in range(50):  # until the server is up, the connection made and the script loaded
                limiter.errors = 0
                await limiter.admit(limited[0])
                if limiter.errors == 0:
                    break
                await asyncio.sleep(0.1)

            def admit(index: int, limiter: Limiter = limiter) -> Awaitable[object]:
                return limiter.admit(limited[index % len(limited)])

            def ping(index: int, link: RedisLink = link) -> Awaitable[object]:
                return link.run("bench", lambda redis: redis.ping())

            micros = await best_of_async(5, iterations, admit)
            assert limiter.errors == 0, "the Redis backend failed during the run"
            rows.append((f"admit: rpm + tpm + tpd, redis ({name})", micros))
            rows.append((f"… a PING through the same link ({name})", await best_of_async(5, iterations, ping)))
            await link.close()
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.iterations, args.clients))
