"""Where the proxy spends its CPU: sample it with py-spy, then rank manaproxy's own code.

py-spy (`--format raw`) writes one line per distinct stack, root first: `frame;frame;... count`, each
frame `function (path:line)`. Only samples where the process was on CPU are kept (py-spy drops idle
ones), so shares below are shares of the proxy's busy time. Only the event-loop thread counts: py-spy
takes some blocked threads for busy ones (pycares' shutdown thread waiting on `SimpleQueue.get` shows as
always on CPU), and nothing of the request path runs elsewhere. Three views:
- by layer: which package the sampled (leaf) frame is in: manaproxy, aiohttp, asyncio ...;
- by manaproxy function: inclusive share (the function is on the stack) and self share (it is the leaf);
- by manaproxy line: each sample charged to the deepest manaproxy frame on its stack, with the library
  call below it that took the time — the actionable view.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>.*):(?P<line>\d+)\)$")
OWN_PACKAGE = "manaproxy/"
# Frames every sample of the loop thread passes through (`python -m manaproxy` → cli.main → uvloop.run):
# they are not where the time goes.
BOOTSTRAP = ("manaproxy/__main__.py", "manaproxy/cli.py")
_LOOP_ROOTS = (*BOOTSTRAP, "uvloop/__init__.py", "asyncio/runners.py")


@dataclass(frozen=True, slots=True)
class Frame:
    func: str
    path: str  # shortened: manaproxy/sse.py, aiohttp/web_protocol.py, asyncio/events.py
    line: int

    @property
    def own(self) -> bool:
        return self.path.startswith(OWN_PACKAGE) and self.path not in BOOTSTRAP

    @property
    def where(self) -> str:
        return f"{self.path}:{self.func}"

    @property
    def layer(self) -> str:
        head = self.path.split("/", 1)[0]
        return head.removesuffix(".py") if "/" in self.path else "stdlib/other"


def shorten(path: str) -> str:
    """A path relative to the package root it belongs to (site-packages, the stdlib or this repo)."""
    for marker in ("/site-packages/", f"/{OWN_PACKAGE}"):
        index = path.rfind(marker)
        if index != -1:
            return path[index + 1 :] if marker == f"/{OWN_PACKAGE}" else path[index + len(marker) :]
    match = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return match.group(1) if match else path


def parse_frame(text: str) -> Frame:
    match = _FRAME.match(text)
    if match is None:
        return Frame(text, "?", 0)
    return Frame(match["func"], shorten(match["path"]), int(match["line"]))


def parse_raw(text: str) -> list[tuple[list[Frame], int]]:
    """(stack root first, sample count) for every line of py-spy's raw output."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([parse_frame(f) for f in stack.split(";")], int(count)))
    return stacks


def summarize(stacks: list[tuple[list[Frame], int]], top: int = 12) -> dict[str, object]:
    """The three views above, as percentages of all samples."""
    other_threads = sum(count for frames, count in stacks if frames[0].func == "Thread._bootstrap")
    stacks = [(frames, count) for frames, count in stacks if frames[0].func != "Thread._bootstrap"]
    total = sum(count for _, count in stacks) or 1
    layers: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    lines: Counter[tuple[str, str]] = Counter()
    own_on_stack = 0
    for frames, count in stacks:
        leaf = frames[-1]
        layers["manaproxy" if leaf.own else leaf.layer] += count
        for where in {f.where for f in frames if f.own}:
            inclusive[where] += count
        if leaf.own:
            self_time[leaf.where] += count
        deepest = max((i for i, f in enumerate(frames) if f.own), default=None)
        if deepest is None:
            # Not below a handler: aiohttp's protocols (parsing, transport callbacks), the loop itself.
            root = next((f for f in frames if f.path not in _LOOP_ROOTS and not f.path.startswith("<")), leaf)
            lines[("(no manaproxy frame)", f"{root.path}:{root.func}")] += count
            continue
        own_on_stack += count
        frame = frames[deepest]
        below = frames[deepest + 1] if deepest + 1 < len(frames) else None
        callee = f"{below.path}:{below.func}" if below is not None else "(own code)"
        lines[(f"{frame.path}:{frame.line} {frame.func}", callee)] += count

    def pct(value: int) -> float:
        return round(100 * value / total, 1)

    return {
        "samples": total,
        "other_thread_samples": other_threads,
        "own_on_stack_pct": pct(own_on_stack),
        "by_layer_pct": {name: pct(n) for name, n in layers.most_common()},
        "functions": [
            {"function": where, "inclusive_pct": pct(n), "self_pct": pct(self_time[where])}
            for where, n in inclusive.most_common(top)
        ],
        "lines": [{"line": line, "calls": callee, "pct": pct(n)} for (line, callee), n in lines.most_common(top)],
    }


def start_recording(pyspy: str, pid: int, seconds: float, output: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    """Run `py-spy record` on `pid` in the background; wait on the returned process for the file."""
    argv = [pyspy, "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", str(rate)]
    argv += ["--format", "raw", "--full-filenames", "--output", str(output)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
