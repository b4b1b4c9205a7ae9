"""`logfmt`: values escaped so no outside string can end a log line, the formatter's safety net, and the
handler that writes a loop turn's lines at once."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from manaproxy.cli import JournalFormatter
from manaproxy.logfmt import BatchedStreamHandler, OneLineFormatter, value


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (None, "-"),
        ("", "-"),
        ("/v1/health", "/v1/health"),
        ("/v1/health\n<2>FORGED", r'"/v1/health\n<2>FORGED"'),
        ("a\r\nb", r'"a\r\nb"'),
        ("\u2028next", r'"\u2028next"'),  # a Unicode line separator is no printable character either
        ("esc\x1b[31m", r'"esc\u001b[31m"'),
    ],
)
def test_values_never_hold_a_line_break_or_control_character(raw, shown):
    assert value(raw) == shown


@pytest.mark.parametrize("formatter", [OneLineFormatter("%(message)s"), JournalFormatter("%(message)s")])
def test_a_raw_outside_value_in_a_log_call_still_makes_one_line(formatter):
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "path %s", ("/x\n<2>FORGED\r\x00",), None)

    line = formatter.format(record)

    assert line.count("\n") == 0
    assert line.endswith("path /x\\n<2>FORGED\\r\\u0000")


def test_a_traceback_still_follows_on_its_own_lines():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())

    lines = OneLineFormatter("%(message)s").format(record).splitlines()

    assert lines[0] == "failed"
    assert lines[-1] == "ValueError: boom"


class CountingStream(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def batched_logger() -> tuple[logging.Logger, CountingStream]:
    stream = CountingStream()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    log = logging.Logger("batched")  # outside the logging tree: no other handler sees these lines
    log.addHandler(handler)
    return log, stream


async def test_the_lines_of_one_loop_turn_go_out_in_order_in_one_write():
    log, stream = batched_logger()

    for number in range(5):
        log.warning("line %d", number)
    assert stream.getvalue() == ""  # not yet: at the end of this turn of the loop
    await asyncio.sleep(0)

    assert stream.getvalue() == "".join(f"WARNING line {number}\n" for number in range(5))
    assert stream.writes == 1


def test_outside_a_loop_and_on_flush_nothing_waits():
    log, stream = batched_logger()

    log.warning("no loop running")
    assert stream.getvalue() == "WARNING no loop running\n"

    async def log_then_flush() -> str:
        log.warning("pending")
        log.handlers[0].flush()  # what `logging.shutdown` does at exit
        return stream.getvalue()

    assert asyncio.run(log_then_flush()).endswith("WARNING pending\n")


def test_a_shared_stream_gets_whole_lines_in_writes_a_pipe_keeps_whole() -> None:
    """Workers share their supervisor's stderr: each write holds whole lines and at most PIPE_BUF bytes
    (unless one line alone is longer), so no other process's write lands inside a line."""

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return len(text)

    stream = Writes()
    handler = BatchedStreamHandler(stream, shared=True)
    lines = [f"line {index} " + "x" * 300 for index in range(40)] + ["long " + "y" * 5000, "last"]
    handler._write(lines)
    assert "".join(stream.writes) == "\n".join(lines) + "\n"
    assert all(write.endswith("\n") for write in stream.writes)
    assert all(len(write.encode()) <= 4096 for write in stream.writes if "long" not in write)
    assert len(stream.writes) > 3


def test_the_time_stamp_kept_for_a_second_reads_as_loggings_own() -> None:
    """`OneLineFormatter` runs strftime once a second, not once a line: the stamps are logging's, to the ms."""
    ours = OneLineFormatter("%(asctime)s %(message)s")
    theirs = logging.Formatter("%(asctime)s %(message)s")
    for created in (1_700_000_000.001, 1_700_000_000.5, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_061.25):
        record = logging.makeLogRecord({"msg": "hello", "created": created, "msecs": (created % 1) * 1000})
        assert ours.format(record) == theirs.format(record)
    assert ours.usesTime()
    assert not OneLineFormatter("%(message)s").usesTime()
