"""The request log: one logfmt line per proxied request, written once when it ends.

logfmt (`key=value`, values quoted when needed) reads well in journald and parses with any logfmt
tool (Loki, `lnav`, `hl`). Never a key or a body: only ids, model names, reasons and numbers.
"""

from __future__ import annotations

import logging

from .record import RequestRecord

logger = logging.getLogger("manaproxy.request")


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


def _value(value: object) -> str:
    """One logfmt value: bare when it can be, else double-quoted with `\\` escapes; `-` for none."""
    text = "-" if value is None or value == "" else str(value)
    if text.isprintable() and _NEEDS_QUOTES.isdisjoint(text):
        return text
    # Escaping every control character keeps a client-chosen string from forging a second log line.
    return '"' + "".join(_escape(char) for char in text) + '"'


def format_record(record: RequestRecord) -> str:
    """The request's log line: `key=value` pairs in a fixed order (documented in deploy/README.md)."""
    attempts = ",".join(f"{a.target}:{a.reason}" for a in record.attempts)
    fields: list[tuple[str, object]] = [
        ("request_id", record.request_id),
        ("endpoint", record.endpoint),
        ("model", record.requested[:200]),
        ("resolved", record.target),
        ("attempts", attempts),
        ("status", record.status),
        ("stream", "true" if record.streaming else "false"),
        ("outcome", record.outcome),
        ("ttfb_ms", None if record.first_byte is None else round(record.first_byte * 1000, 1)),
        ("duration_ms", round(record.duration * 1000, 1)),
        ("prompt_tokens", record.prompt_tokens),
        ("completion_tokens", record.completion_tokens),
        ("error", record.error_type),
    ]
    return " ".join(f"{key}={_value(value)}" for key, value in fields)


def log_request(record: RequestRecord) -> None:
    """Observer: write the request's line (warning level when it failed)."""
    level = logging.WARNING if record.status >= 500 or record.outcome not in (None, "completed") else logging.INFO
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_record(record))
