"""Child processes of the benchmark: start, wait until they answer, account their CPU, stop them.

Every service runs in its own session (process group) so that stopping it ends whatever it spawned
and nothing else: the harness signals only the groups it created, by id. CPU time is read from
/proc (utime + stime of the process and its descendants), which is how the proxy's cost per request
and per token is measured without instrumenting it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


RESULTS = Path(__file__).resolve().parent / "results"  # gitignored


def result_path(kind: str, suffix: str = ".json") -> Path:
    """A new file for a run's results, `bench/results/<kind>-<time><suffix>` (the folder made if missing)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


def save_results(kind: str, document: object, *, indent: int = 2) -> Path:
    """Write a run's results as JSON to a new `result_path(kind)`; the path written."""
    path = result_path(kind)
    path.write_text(json.dumps(document, indent=indent))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its descendants (all threads), in seconds."""
    total = 0
    for each in descendants(pid):
        fields = _stat_fields(each)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores (from /proc/stat).

    Busy is user + nice + system only: interrupt time (loopback traffic is mostly softirq) is charged to
    no process, so leaving it out keeps busy comparable with the processes' utime + stime.
    """
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return sum(values[:3]) / CLOCK_TICKS, total / CLOCK_TICKS


def children_cpu() -> float:
    """User + system CPU time of this process's waited-for children (the load generators it ran), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak resident size since the process started), in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def open_fds(pid: int) -> int:
    """How many file descriptors `pid` has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def tree_memory_kib(pid: int) -> dict[str, int]:
    """`memory_kib` summed over `pid` and its descendants (a supervisor and its workers).

    VmHWM summed is the sum of each process's own peak: at least the peak of the sum, equal for one process.
    A process that exits between the listing and the reading counts as 0.
    """
    total = {"VmRSS": 0, "VmHWM": 0}
    for each in descendants(pid):
        with contextlib.suppress(OSError):
            for key, value in memory_kib(each).items():
                total[key] += value
    return total


def tree_open_fds(pid: int) -> int:
    """`open_fds` summed over `pid` and its descendants."""
    total = 0
    for each in descendants(pid):
        with contextlib.suppress(OSError):
            total += open_fds(each)
    return total


def fd_limit(pid: int) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE of `pid`: the soft one is what its accept() and connect() run into."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise RuntimeError(f"no 'Max open files' in /proc/{pid}/limits")


def time_wait_sockets(ports: Collection[int]) -> int:
    """TCP sockets in TIME_WAIT (state 06 in /proc/net/tcp and tcp6) with a local or remote port in `ports`."""
    wanted = {f"{port:04X}" for port in ports}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)
            for line in lines:
                _, local, remote, state = line.split(None, 4)[:4]
                if state == "06" and (local.rpartition(":")[2] in wanted or remote.rpartition(":")[2] in wanted):
                    count += 1
    return count


def tcp_ext_counters(
    names: Collection[str] = ("ListenOverflows", "SyncookiesSent", "SyncookiesFailed"),
) -> dict[str, int]:
    """Machine-wide TCP counters from /proc/net/netstat (`nstat`'s TcpExt*): e.g. a full accept queue."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head[0] == "TcpExt:":
            table = dict(zip(head[1:], values[1:], strict=True))
            return {name: int(table.get(name, 0)) for name in names}
    return {}


def set_affinity(pid: int, cores: set[int]) -> None:
    """Move every thread of `pid` and of its descendants to `cores` (what `taskset -a -p` does)."""
    for each in descendants(pid):
        for task in Path(f"/proc/{each}/task").glob("*"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cores)


class Service:
    """A long-running child process (upstream, proxy) whose output goes to a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    def __repr__(self) -> str:
        return f"<Service {self.name} pid={self.pid} {'running' if self.running else 'exited'}>"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, url: str, timeout: float) -> None:
        """Poll `url` until it answers 200; raise RuntimeError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout:g}s:\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the service's own process group, SIGKILL after `grace` seconds."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self._proc.wait()
        else:
            # The leader is gone; anything it left in its group goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


async def until_stopped() -> None:
    """Return once the process gets SIGTERM or SIGINT: the end of every bench server's `serve()`."""
    import asyncio

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()


@contextmanager
def unwind_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM unwind as KeyboardInterrupt, so the `finally` that stops the children runs.

    SIGINT is set explicitly: a shell starts background jobs with it ignored, and Python keeps it so.
    """

    def handler(signum: int, frame: object) -> NoReturn:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of `values` (not necessarily sorted); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
