"""`manaproxy serve` with `server.workers` > 1: a small supervisor over N worker processes on one port.

Rule of this module: the supervisor serves no request and builds no application. It starts the workers
(each a `manaproxy serve` of its own: its own event loop, the same config file, its own socket bound to the
port with `SO_REUSEPORT`, so the kernel spreads new connections over them), restarts one that dies (after a
backoff that grows while restarts keep failing), forwards SIGHUP and SIGTERM, and is the only process that
talks to systemd: workers get no `$NOTIFY_SOCKET`.

Each worker holds one end of a socketpair (`WorkerLink`, passed as `--worker INDEX:FD`) and writes one line
per event on it: `listening` once its port is open, `reload success|failure` after each reload. So the
supervisor says `READY=1` only once every worker listens, and reports a reload once, with each worker's
result. A worker that reads the end of that link (its supervisor is gone, even SIGKILLed) drains and exits.

Counters of every worker are summed through prometheus_client's multiprocess mode: the supervisor makes a
private directory for the workers' metric files (`PROMETHEUS_MULTIPROC_DIR`), marks a dead worker's files
(`mark_process_dead`) and removes the directory when it exits (hostmetrics.py reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client.multiprocess import mark_process_dead

from . import hostmetrics
from .config import Config, ConfigError, load_config
from .systemd import notify

logger = logging.getLogger("manaproxy.supervisor")

WORKER_ARG = "--worker"
LISTENING = "listening"
# A worker that served this long before it died is restarted after the first backoff step again.
_STABLE_SECONDS = 10.0
_FIRST_BACKOFF_SECONDS = 0.5
_MAX_BACKOFF_SECONDS = 30.0
# How long a reload waits for the workers' results (a reload reads and validates one file).
_RELOAD_WAIT_SECONDS = 10.0
# Past `shutdown_timeout_seconds`: the worker's cut grace and aiohttp's straggler bound (cli.py, server.py),
# and a margin; then what is left is killed.
_STOP_MARGIN_SECONDS = 6.0


def worker_count(setting: int | Literal["auto"]) -> int:
    """`server.workers` as a number of processes: `auto` is one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if setting == "auto" else setting


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerLink:
    """The worker's end of its socketpair to the supervisor (see the module docstring)."""

    def __init__(self, spec: str) -> None:
        index, _, fd = spec.partition(":")
        self.index = int(index)
        self._sock = socket.socket(fileno=int(fd))
        self._sock.setblocking(False)

    def __repr__(self) -> str:
        return f"<WorkerLink worker={self.index} fd={self._sock.fileno()}>"

    def send(self, message: str) -> None:
        # A line of a few bytes into an empty socket buffer: never blocks. A supervisor gone is noticed by `watch`.
        with contextlib.suppress(OSError):
            self._sock.send(message.encode() + b"\n")

    def reloaded(self, result: str) -> None:
        """A `Reloader` listener: the supervisor collects every worker's result."""
        self.send(f"reload {result}")

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Call `on_lost` (in the running loop) once the supervisor's end is closed."""
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()

        def readable() -> None:
            try:
                data = self._sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                logger.warning("the supervisor is gone: stopping")
                on_lost()

        loop.add_reader(fd, readable)


class Worker:
    """One running worker process, as the supervisor sees it."""

    def __init__(
        self, index: int, proc: asyncio.subprocess.Process, link: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    ) -> None:
        self.index = index
        self.proc = proc
        # The writer is never written to but must stay referenced: a collected StreamWriter closes the link.
        self.reader, self.writer = link
        self.listening: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.reload_result: asyncio.Future[str] | None = None

    def __repr__(self) -> str:
        return f"<Worker {self.index} pid={self.proc.pid} listening={self.listening.done()}>"


class Supervisor:
    """Runs `count` workers of `manaproxy serve --config config_path` on host:port until SIGTERM/SIGINT."""

    def __init__(self, config: Config, config_path: str, host: str, port: int, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.host = host
        self.port = port
        self.count = count
        self.workers: dict[int, Worker] = {}
        self.metrics_dir = ""
        self._stop = asyncio.Event()
        self._ready = False
        self._startup_failed: asyncio.Future[int] | None = None
        self._changed = asyncio.Event()  # a worker listens or failed to start, or a stop was asked: look again
        self._exits: list[tuple[int, int]] = []  # (pid, exit code) of the workers that ended while stopping
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Supervisor workers={sorted(self.workers)} ready={self._ready} stopping={self._stop.is_set()}>"

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain every worker; the exit code."""
        loop = asyncio.get_running_loop()
        self._startup_failed = loop.create_future()
        self.metrics_dir = tempfile.mkdtemp(prefix="manaproxy-metrics-")
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_stop)
        slots = [loop.create_task(self._keep(index)) for index in range(1, self.count + 1)]
        try:
            code = await self._start()
            if code == 0:
                await self._stop.wait()
            self._stop.set()  # also when a worker failed to start: the others stop with it
            notify("STOPPING=1")
            return max(code, await self._drain(slots))
        finally:
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as cli.serve: a late reload must not kill us
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _start(self) -> int:
        """Wait until every worker listens (0), or one exits before it does (its code, at least 1)."""
        assert self._startup_failed is not None
        while len(self.workers) < self.count or not all(w.listening.done() for w in self.workers.values()):
            if self._startup_failed.done():
                return max(1, self._startup_failed.result())
            if self._stop.is_set():
                return 0
            self._changed.clear()
            await self._changed.wait()
        self._ready = True
        pids = ", ".join(str(w.proc.pid) for w in sorted(self.workers.values(), key=lambda w: w.index))
        logger.info(
            "listening on http://%s:%s with %d workers (pids %s; %s)",
            self.host,
            self.port,
            self.count,
            pids,
            self.config.summary(),
        )
        notify(f"READY=1\nSTATUS=serving {self.config.summary()} with {self.count} workers")
        return 0

    async def _keep(self, index: int) -> None:
        """Keep worker `index` running until the supervisor stops: start it, restart it when it dies."""
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                worker = await self._spawn(index)
            except OSError as exc:  # no process could be made (out of memory, of processes, of files)
                pid, code, what = 0, 1, f"could not be started: {exc}"
            else:
                code = await worker.proc.wait()
                self._gone(worker)
                pid, what = worker.proc.pid, describe_exit(code)
            if self._stop.is_set():
                return
            if not self._ready:
                logger.error("worker %d (pid %d) %s before listening: stopping", index, pid, what)
                if self._startup_failed is not None and not self._startup_failed.done():
                    self._startup_failed.set_result(code)
                self._changed.set()
                return
            failures = 0 if time.monotonic() - started >= _STABLE_SECONDS else failures + 1
            delay = min(_MAX_BACKOFF_SECONDS, _FIRST_BACKOFF_SECONDS * 2 ** max(0, failures - 1))
            level = logging.ERROR if code == -signal.SIGKILL else logging.WARNING
            hint = " (out of memory?)" if code == -signal.SIGKILL else ""
            logger.log(level, "worker %d (pid %d) %s%s; restarting it in %gs", index, pid, what, hint, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _spawn(self, index: int) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {key: value for key, value in os.environ.items() if key not in ("NOTIFY_SOCKET", "WATCHDOG_PID")}
        env[hostmetrics.ENV] = self.metrics_dir
        env[hostmetrics.WORKER_ENV] = str(index)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "manaproxy",
                "serve",
                "--config",
                self.config_path,
                "--host",
                self.host,
                "--port",
                str(self.port),
                WORKER_ARG,
                f"{index}:{theirs.fileno()}",
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                # Its own process group: a terminal's Ctrl-C or hangup reaches the supervisor alone, which
                # forwards it once (a worker signalled twice would reload twice).
                process_group=0,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = self.workers[index] = Worker(index, proc, await asyncio.open_connection(sock=ours))
        if self._stop.is_set():  # started as the stop began: it drains with the others
            proc.send_signal(signal.SIGTERM)
        task = asyncio.get_running_loop().create_task(self._listen(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return worker

    async def _listen(self, worker: Worker) -> None:
        """Read the worker's lines until its link closes."""
        async for raw in worker.reader:
            message = raw.decode(errors="replace").strip()
            if message == LISTENING and not worker.listening.done():
                worker.listening.set_result(None)
                self._changed.set()
                if self._ready:
                    logger.info("worker %d restarted: pid %d listening", worker.index, worker.proc.pid)
            elif message.startswith("reload ") and worker.reload_result and not worker.reload_result.done():
                worker.reload_result.set_result(message.split(" ", 1)[1])

    def _gone(self, worker: Worker) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stop.is_set():
            self._exits.append((worker.proc.pid, worker.proc.returncode or 0))
        if worker.reload_result is not None and not worker.reload_result.done():
            worker.reload_result.set_result("exited")
        worker.writer.close()
        # Its live gauges leave the sums; its counters stay in them (no counter goes backwards).
        mark_process_dead(worker.proc.pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _on_stop(self) -> None:
        self._stop.set()
        self._changed.set()

    def _on_hup(self) -> None:
        if self._stop.is_set():
            logger.info("SIGHUP ignored: stopping")
            return
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        """Forward SIGHUP to every listening worker; report once, with each worker's result."""
        async with self._reload_lock:
            if self._stop.is_set():
                return
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            workers = sorted((w for w in self.workers.values() if w.listening.done()), key=lambda w: w.index)
            logger.info("SIGHUP: reloading %s in %d workers", self.config_path, len(workers))
            loop = asyncio.get_running_loop()
            for worker in workers:
                worker.reload_result = loop.create_future()
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGHUP)
            futures = [w.reload_result for w in workers if w.reload_result is not None]
            if futures:
                await asyncio.wait(futures, timeout=_RELOAD_WAIT_SECONDS)
            results = [
                (w, w.reload_result.result() if w.reload_result and w.reload_result.done() else "no answer")
                for w in workers
            ]
            for worker in workers:
                worker.reload_result = None
            report = ", ".join(f"worker {w.index} (pid {w.proc.pid}) {result}" for w, result in results)
            failed = sum(1 for _, result in results if result != "success")
            if failed:
                logger.error(
                    "reload failed in %d of %d workers (each keeps the config it had): %s", failed, len(results), report
                )
                status = "reload rejected; serving the previous config"
            else:
                with contextlib.suppress(ConfigError):
                    self.config = load_config(self.config_path)  # what the workers now serve: for STATUS and the drain
                logger.info("reload done in all %d workers: %s", len(results), report)
                status = f"serving {self.config.summary()} with {self.count} workers"
            if not self._stop.is_set():
                notify(f"READY=1\nSTATUS={status}")

    async def _drain(self, slots: list[asyncio.Task[None]]) -> int:
        """SIGTERM every worker and wait for their drains (each slot ends with its worker), killing what
        outlives them; 0 if every worker ended well."""
        timeout = self.config.server.shutdown_timeout_seconds
        logger.info("stopping: %d workers draining (up to %gs)", len(self.workers), timeout)
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        _, late = await asyncio.wait(slots, timeout=timeout + _STOP_MARGIN_SECONDS)
        if late:
            for worker in list(self.workers.values()):
                logger.warning(
                    "worker %d (pid %d) still running after the drain: killed", worker.index, worker.proc.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
            await asyncio.wait(late)
        bad = {pid: describe_exit(code) for pid, code in self._exits if code not in (0, -signal.SIGTERM)}
        if bad:
            logger.warning("stopped; workers that did not end cleanly: %s", bad)
            return 1
        logger.info("stopped: all workers drained")
        return 0


async def supervise(config: Config, config_path: str, host: str, port: int, count: int) -> int:
    """`manaproxy serve` with `count` workers; the exit code."""
    return await Supervisor(config, config_path, host, port, count).run()
