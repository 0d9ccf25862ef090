"""The access log's budget: a flood of failed requests cannot flood the log."""

from __future__ import annotations

import logging

from centripy.server import LogBudget


def _record(n: int) -> logging.LogRecord:
    return logging.LogRecord(
        "tornado.access", logging.WARNING, "", 0, "401 POST /api %d", (n,), None
    )


def test_at_most_per_second_pass_and_the_next_second_says_how_many_were_dropped() -> None:
    now = [100.0]
    budget = LogBudget(per_second=3, clock=lambda: now[0])
    passed = [budget.filter(_record(i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    now[0] = 101.2
    first = _record(10)
    assert budget.filter(first)
    assert first.getMessage() == "401 POST /api 10 (and 7 similar lines dropped)"
    second = _record(11)
    assert budget.filter(second) and second.getMessage() == "401 POST /api 11"
