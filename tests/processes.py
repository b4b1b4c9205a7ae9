"""Real `manaproxy serve` child processes for tests, and the small helpers process tests share."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from .fakes import gated_stream as gated_stream  # re-exported: test_shutdown_drain.py imports it from here

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """One `manaproxy serve` child process, its stderr collected line by line."""

    def __init__(self, config_path: Path, env: dict[str, str], *, cwd: Path = ROOT, args: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.port = free_port()
        # This checkout's manaproxy, whatever the working directory (where `serve` looks for a `.env`).
        self.env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}
        self.cwd = cwd
        self.args = tuple(args)  # more `serve` options (`--env-file ...`)
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, wait: bool = True) -> ServeProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "manaproxy",
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(self.port),
            *self.args,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_stderr())
        if wait:
            await self.wait_healthy()
        return self

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            async with self._new_line:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._new_line.notify_all()

    async def wait_healthy(self, timeout: float = 10.0) -> None:
        """Poll GET /health until the process answers."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise AssertionError(f"manaproxy exited with {self.proc.returncode}:\n{self.stderr}")
                try:
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"manaproxy did not start:\n{self.stderr}")
                await asyncio.sleep(0.02)

    async def wait_line(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        """The first stderr line (seen so far or to come) matching `predicate`."""
        async with asyncio.timeout(timeout), self._new_line:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                await self._new_line.wait()

    def lines_with(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def reload(self, config_text: str) -> None:
        """Write a new config and SIGHUP; return once the process logged the reload's outcome."""
        done = len(self.lines_with("reloaded ")) + len(self.lines_with("reload rejected"))
        self.config_path.write_text(config_text)
        self.signal(signal.SIGHUP)
        async with asyncio.timeout(5), self._new_line:
            while len(self.lines_with("reloaded ")) + len(self.lines_with("reload rejected")) == done:
                await self._new_line.wait()

    async def wait_exit(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        assert self._reader is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def post_to(session: aiohttp.ClientSession, url: str, model: str, **extra: object) -> aiohttp.ClientResponse:
    """A chat request for `model` to the process at `url`, read to its end."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    resp = await session.post(url + "/v1/chat/completions", json=body)
    await resp.read()
    return resp


def read_datagrams(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def next_datagram(sock: socket.socket, timeout: float = 5.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            try:
                return sock.recv(4096).decode()
            except BlockingIOError:
                await asyncio.sleep(0.01)


class RedisServer:
    """A real `redis-server` child on a unix socket in its own temporary directory (no persistence), for the
    cache's tests: `url` for `redis.url`; `kill`, `start` again (the same socket: a restart), `pause`/`resume`
    (SIGSTOP/SIGCONT: a Redis that accepts connections and answers nothing)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        self.binary = binary
        # A short directory: a unix socket path must fit in 108 bytes, and pytest's tmp_path may not.
        self.directory = Path(tempfile.mkdtemp(prefix="manaproxy-redis-"))
        self.socket = self.directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.socket} pid={self.proc.pid if self.proc else None}>"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 5.0) -> RedisServer:
        """Start it and wait (at most `timeout` seconds) until it answers PING."""
        self.socket.unlink(missing_ok=True)
        argv = [self.binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.directory), "--loglevel", "warning"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.socket.exists():
                with socket.socket(socket.AF_UNIX) as sock:
                    try:
                        sock.settimeout(1.0)
                        sock.connect(str(self.socket))
                        sock.sendall(b"PING\r\n")
                        if sock.recv(16).startswith(b"+PONG"):
                            return self
                    except OSError:
                        pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {self.proc.returncode}")
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server did not answer within {timeout:g}s")

    def kill(self) -> None:
        """SIGKILL, and wait for it to be gone (its socket file stays behind, refusing connections)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
