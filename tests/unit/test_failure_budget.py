"""The per-client budget of failed verifications: a GCRA bucket per key, bounded in keys."""

from __future__ import annotations

import pytest

from gateway.core.failure_budget import FailureBudget
from gateway.core.gcra import Rate


def test_a_client_may_fail_burst_times_then_waits_for_the_refill() -> None:
    budget = FailureBudget(Rate(5, 10.0, 5))  # 5 at once, then one every 2 s
    now = 100.0
    for _ in range(5):
        assert not budget.exhausted("a", now)
        budget.spend("a", now)
    assert budget.exhausted("a", now)
    assert budget.exhausted("a", now + 1.9)
    assert not budget.exhausted("a", now + 2.0)
    # other clients are not touched
    assert not budget.exhausted("b", now)


def test_spending_an_exhausted_budget_does_not_push_the_refill_further() -> None:
    budget = FailureBudget(Rate(1, 10.0, 1))
    budget.spend("a", 0.0)
    for _ in range(100):
        budget.spend("a", 1.0)
    assert not budget.exhausted("a", 10.0)


def test_a_full_bucket_is_forgotten() -> None:
    budget = FailureBudget(Rate(2, 2.0, 2))
    budget.spend("a", 0.0)
    assert len(budget) == 1
    assert not budget.exhausted("a", 5.0)
    assert len(budget) == 0


def test_keys_are_bounded_and_the_least_recent_goes_first() -> None:
    budget = FailureBudget(Rate(1, 3600.0, 1), max_keys=3)
    for n, key in enumerate("abcd"):
        budget.spend(key, float(n))
    assert len(budget) == 3
    assert not budget.exhausted("a", 4.0)  # pushed out by d
    assert all(budget.exhausted(k, 4.0) for k in "bcd")
    budget.spend("b", 5.0)  # b already spent: stays, refused, not moved
    budget.spend("e", 6.0)
    assert not budget.exhausted("b", 7.0)
    assert budget.exhausted("e", 7.0)


def test_a_new_rate_starts_afresh_and_the_same_rate_keeps_the_state() -> None:
    budget = FailureBudget(Rate(1, 10.0, 1))
    budget.spend("a", 0.0)
    budget.reconfigure(Rate(1, 10.0, 1))
    assert budget.exhausted("a", 0.0)
    budget.reconfigure(Rate(10, 10.0, 10))  # a TAT means nothing under another rate
    assert not budget.exhausted("a", 0.0)


def test_wait_is_zero_while_failures_are_left_then_the_time_to_the_next_one() -> None:
    budget = FailureBudget(Rate(10, 60.0, 10))  # 10 at once, then one every 6 s
    assert budget.wait_s("a", 0.0) == 0.0  # never seen
    for _ in range(9):
        budget.spend("a", 0.0)
    assert budget.wait_s("a", 0.0) == 0.0  # one left
    budget.spend("a", 0.0)
    assert budget.wait_s("a", 0.0) == pytest.approx(6.0)
    assert budget.wait_s("a", 4.5) == pytest.approx(1.5)
    assert budget.wait_s("a", 6.0) == 0.0
    assert budget.exhausted("a", 5.9)
    assert not budget.exhausted("a", 6.0)
