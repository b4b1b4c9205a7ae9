"""`GET /v1/failures`: the last requests that failed or fell back, for the people on call.

Rule of this module: a bounded ring buffer fed by one request observer, and the request path pays one
append for it. An item holds ids, names, reason words, statuses and times — never a prompt, an answer, an
upstream's message or a key (a failure's `detail` may quote any of those, so it stays out).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, get_args

from aiohttp import web

from ..failures import RaceReason
from ..record import CLIENT_DISCONNECTED, COMPLETED, RequestRecord
from .json import json_response

CAPACITY = 100  # items kept; the oldest makes room
MODEL_CHARS = 200  # a requested model name is the client's: cut, as in the request log

_RACE_REASONS: frozenset[str] = frozenset(get_args(RaceReason))
_FINE_OUTCOMES = (None, COMPLETED, CLIENT_DISCONNECTED)
# Refusals a client earns itself (its request limits, its allow-list, its share of the body budget).
_CLIENTS_OWN = frozenset({"rate_limit_exceeded", "model_not_allowed", "client_body_budget_exhausted"})

Item = dict[str, Any]
ItemListener = Callable[[Item], None]


def noteworthy(record: RequestRecord) -> bool:
    """A request that failed (5xx, 429, a stream cut by an upstream) or fell back (a chain entry skipped or
    failed before the one that answered; a hedge that lost a race is neither). A client refused by its own
    limits, before any chain entry was looked at, is not: one client hammering its limit would push the
    providers' failures out of the buffer and turn the page red for everyone."""
    if record.error_type in _CLIENTS_OWN and not record.calls and not record.attempts:
        return False
    if record.status >= 500 or record.status == 429 or record.outcome not in _FINE_OUTCOMES:
        return True
    return any(attempt.reason not in _RACE_REASONS for attempt in record.attempts)


def failure_item(record: RequestRecord, time_unix: float) -> Item:
    """What `/v1/failures` and the event stream show of one request."""
    return {
        "time_unix": round(time_unix, 3),
        "request_id": record.request_id,
        "client": record.client,
        "endpoint": record.endpoint,
        "model": record.requested[:MODEL_CHARS],
        "alias": record.alias,
        "resolved": None if record.target is None else str(record.target),
        "attempts": [
            {
                "target": str(attempt.target),
                "reason": attempt.reason,
                "tried": attempt.tried,
                "status": attempt.status,
                "retry_after": None if attempt.retry_after is None else round(attempt.retry_after, 3),
            }
            for attempt in record.attempts
        ],
        "status": record.status,
        "error": record.error_type,
        "outcome": record.outcome,
        "stream": record.streaming,
        "duration_seconds": round(record.duration, 4),
    }


class RecentFailures:
    """The last `CAPACITY` noteworthy requests, oldest first, and who wants to hear of each new one."""

    def __init__(self, capacity: int = CAPACITY, clock: Callable[[], float] = time.time) -> None:
        self.items: deque[Item] = deque(maxlen=capacity)
        self.listeners: list[ItemListener] = []
        self._clock = clock

    def __repr__(self) -> str:
        return f"<RecentFailures {len(self.items)}/{self.items.maxlen}>"

    def observe(self, record: RequestRecord) -> None:
        """Request observer (it runs after the request has ended, see `Gateway.observe`)."""
        if not noteworthy(record):
            return
        item = failure_item(record, self._clock())
        self.items.append(item)
        for listener in self.listeners:
            listener(item)


RECENT_FAILURES = web.AppKey("recent_failures", RecentFailures)


async def list_failures(request: web.Request) -> web.Response:
    """`GET /v1/failures`: newest first."""
    recent = request.app[RECENT_FAILURES]
    return json_response({"capacity": recent.items.maxlen, "failures": list(reversed(recent.items))})
