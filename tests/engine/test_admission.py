"""engine/admission.py: client_connection_limit and client_connection_rate_limit."""

from __future__ import annotations

from centripy.engine.admission import Admission


def test_no_limits_admit_everything() -> None:
    admission = Admission(0, 0, lambda: 10**6)
    assert all(admission.admit() for _ in range(1000))


def test_connection_limit_counts_the_node_connections() -> None:
    held = [0]
    admission = Admission(3, 0, lambda: held[0])
    for _ in range(3):
        assert admission.admit()
        held[0] += 1
    assert not admission.admit() and admission.refused == 1
    held[0] -= 1  # one went away
    assert admission.admit()


def test_rate_limit_is_a_bucket_of_one_seconds_worth() -> None:
    now = [100.0]
    admission = Admission(0, 5, lambda: 0, clock=lambda: now[0])
    assert [admission.admit() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 0.2  # one token back
    assert admission.admit() and not admission.admit()
    now[0] += 10  # never more than one second's worth
    assert [admission.admit() for _ in range(6)] == [True] * 5 + [False]
    assert admission.refused == 4
