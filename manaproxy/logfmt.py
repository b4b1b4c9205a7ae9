"""Log-line values: the one escaping for every client- or upstream-controlled value we log.

Rule of this module: a value that came from outside (a path, a model name, an upstream's message)
enters a log line only through `value()`. It is written bare when that is unambiguous, else
double-quoted with `\\` escapes — logfmt's convention, so a line parses with any logfmt tool (Loki,
`lnav`, `hl`) and no value can end the line early and forge a second one (journald would even take a
`<N>` at the start of a forged line as its priority).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TextIO

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_QUOTES = frozenset(' ="\\')


def _escape(char: str) -> str:
    escaped = _ESCAPES.get(char)
    if escaped is not None:
        return escaped
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with every quote, backslash and non-printable character escaped (no surrounding quotes)."""
    return "".join(_escape(char) for char in text)


def value(item: object) -> str:
    """One logfmt value: bare when it can be, else double-quoted with `\\` escapes; `-` for none."""
    text = "-" if item is None or item == "" else str(item)
    if text.isprintable() and _NEEDS_QUOTES.isdisjoint(text):
        return text
    return '"' + escape(text) + '"'


class OneLineFormatter(logging.Formatter):
    """A formatter whose message part is always one line, whatever a log call passed in.

    The safety net behind `value()`: should a call site ever log an outside value raw, its control
    characters are escaped here. A traceback (`exc_info`) still follows on lines of its own.
    """

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        # Per line, `logging` searches the format for `asctime` and runs strftime: once is enough, and once a
        # second (the milliseconds are appended as logging does). One tuple, swapped whole: threads may log.
        self._uses_time = super().usesTime()
        self._stamp: tuple[int, str] = (-1, "")

    def usesTime(self) -> bool:
        return self._uses_time

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None or self.converter is not time.localtime:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, stamp = self._stamp
        if cached != second:
            stamp = time.strftime(self.default_time_format, time.localtime(second))
            self._stamp = (second, stamp)
        msec_format = self.default_msec_format
        return msec_format % (stamp, record.msecs) if msec_format else stamp

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not record.message.isprintable():
            record.message = "".join(char if char.isprintable() else _escape(char) for char in record.message)
        return super().formatMessage(record)


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, inside a running event loop, writes the lines of one loop turn in one write.

    Lines logged outside a loop, and any `flush()` (which `logging.shutdown` calls at exit), write what is
    pending at once; so a line is lost only if the process is killed within the turn it was logged in.
    Lines keep their order: one buffer, written whole.
    """

    def __init__(self, stream: TextIO, *, shared: bool = False) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # Other processes write to the same stream (workers of one supervisor): write whole lines in writes
        # of at most PIPE_BUF bytes, which a pipe never interleaves with another writer's.
        self._shared = shared

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write now
                self._write([line])
                return
        self._pending.append(line)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():  # `emit` runs under it (`Handler.handle`)
            lines, self._pending = self._pending, []
            if lines:
                self._write(lines)
            else:
                super().flush()

    def _write(self, lines: list[str]) -> None:
        try:
            if self._shared:
                for chunk in _whole_lines(lines, _PIPE_BUF):
                    self.stream.write(chunk)
                    self.stream.flush()
                return
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:
            # What `StreamHandler.emit` does with a failed write (stderr closed ...): report, carry on.
            self.handleError(logging.makeLogRecord({"msg": lines[0]}))


_PIPE_BUF = 4096  # POSIX's minimum, Linux's value: a write this small to a pipe is atomic


def _whole_lines(lines: list[str], limit: int) -> Iterator[str]:
    """`lines` joined into chunks of whole lines, each at most `limit` bytes unless one line alone is longer."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode()) + 1
        if chunk and size + length > limit:
            yield "\n".join(chunk) + "\n"
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "\n".join(chunk) + "\n"
