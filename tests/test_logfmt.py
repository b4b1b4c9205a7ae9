"""`logfmt`: values escaped so no outside string can end a log line, and the formatter's safety net."""

from __future__ import annotations

import logging

import pytest

from manaproxy.cli import JournalFormatter
from manaproxy.logfmt import OneLineFormatter, value


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
