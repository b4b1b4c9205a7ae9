"""The request log: one logfmt line per proxied request, written once when it ends.

logfmt (`key=value`, values quoted and escaped when needed: `logfmt.value`) reads well in journald and
parses with any logfmt tool. Never a key or a body: only ids, model names, reasons and numbers.
"""

from __future__ import annotations

import logging

from . import logfmt
from .record import RequestRecord

logger = logging.getLogger("manaproxy.request")


def format_record(record: RequestRecord) -> str:
    """The request's log line: `key=value` pairs in a fixed order (documented in deploy/README.md).
    Every value goes through `logfmt.value` (one f-string: this runs for every request)."""
    v = logfmt.value
    attempts = ",".join(a.logged for a in record.attempts) if record.attempts else None
    ttfb = None if record.first_byte is None else round(record.first_byte * 1000, 1)
    return (
        f"request_id={v(record.request_id)} endpoint={v(record.endpoint)} model={v(record.requested[:200])} "
        f"resolved={v(record.target)} attempts={v(attempts)} status={record.status} "
        f"stream={'true' if record.streaming else 'false'} outcome={v(record.outcome)} ttfb_ms={v(ttfb)} "
        f"duration_ms={round(record.duration * 1000, 1)} prompt_tokens={v(record.prompt_tokens)} "
        f"completion_tokens={v(record.completion_tokens)} error={v(record.error_type)} client={v(record.client)}"
        f" cache={v(record.cache)}"
    )


def level_of(record: RequestRecord) -> int:
    """WARNING for a request that failed here or upstream; INFO otherwise. A request refused because every
    chain entry was skipped (breakers open, rate limits, saturation) is INFO: during an outage that is
    every request, and the breaker's opening was logged once and `mana_llm_fallback_total` counts them."""
    if record.outcome not in (None, "completed"):
        return logging.WARNING
    if record.status >= 500 and (record.status == 500 or any(attempt.tried for attempt in record.attempts)):
        return logging.WARNING
    return logging.INFO


def log_request(record: RequestRecord) -> None:
    """Observer: write the request's line."""
    level = level_of(record)
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_record(record))
