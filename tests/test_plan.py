"""`plan.hedge_in`: when a hedged race starts the next target beside the attempts in flight."""

from __future__ import annotations

import pytest

from manaproxy.plan import hedge_in


@pytest.mark.parametrize(
    ("racing", "max_extra", "hedging", "delay", "youngest", "now", "wait"),
    [
        (1, 1, True, 0.5, 10.0, 10.2, 0.3),  # the first attempt is not late yet
        (1, 1, True, 0.5, 10.0, 12.0, 0.0),  # late already: at once
        (2, 2, True, 0.5, 11.0, 11.2, 0.3),  # timed from the youngest attempt, not the first
        (2, 1, True, 0.5, 10.0, 10.2, None),  # `max_extra` already race beside the first
        (3, 2, True, 0.5, 10.0, 10.2, None),
        (1, 0, True, 0.5, 10.0, 10.2, None),  # no hedge at all
        (1, 1, False, 0.5, 10.0, 10.2, None),  # the plan or the budget has run out
        (1, 1, True, None, 10.0, 10.2, None),  # `hedge_after: auto` has learned no delay yet
    ],
)
def test_hedge_in(racing, max_extra, hedging, delay, youngest, now, wait):
    got = hedge_in(racing=racing, max_extra=max_extra, hedging=hedging, delay=delay, youngest=youngest, now=now)
    assert got == (None if wait is None else pytest.approx(wait))
