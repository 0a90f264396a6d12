"""Retry backoff and retry budget (pure, fake clock)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import Retries
from gateway.core.retry import IDEMPOTENT_METHODS, RetryBudget, backoff_s


@pytest.mark.parametrize(
    ("attempt", "rand", "cfg", "expected"),
    [
        (0, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.05),
        (1, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.1),
        (2, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.2),
        (4, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.8),
        (5, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 1.0),  # capped
        (10_000, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 1.0),  # no overflow
        (3, 0.5, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.2),  # full jitter
        (3, 0.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.0),
        (0, 0.5, {"backoff_s": 0.0, "backoff_max_s": 0.0}, 0.0),
        (-1, 1.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.05),  # treated as the first
        (0, 7.0, {"backoff_s": 0.05, "backoff_max_s": 1.0}, 0.05),  # rand clamped to [0, 1]
    ],
)
def test_backoff(attempt: int, rand: float, cfg: dict[str, Any], expected: float) -> None:
    assert backoff_s(attempt, Retries(**cfg), rand) == pytest.approx(expected)


def test_backoff_stays_within_bounds_for_any_rand() -> None:
    cfg = Retries(backoff_s=0.1, backoff_max_s=0.3)
    for attempt in range(8):
        cap = min(0.3, 0.1 * 2**attempt)
        for i in range(11):
            assert 0.0 <= backoff_s(attempt, cfg, i / 10) <= cap + 1e-12


def test_idempotent_methods() -> None:
    assert {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"} == IDEMPOTENT_METHODS
    assert "POST" not in IDEMPOTENT_METHODS
    assert "PATCH" not in IDEMPOTENT_METHODS


# Events: ("req", t) a client request, ("retry", t) a retry made, ("can", t, bool) expectation.
BUDGET_CASES: list[tuple[str, dict[str, float], list[tuple[Any, ...]]]] = [
    (
        "a quiet upstream may still retry once",
        {"ratio": 0.2},
        [("req", 0), ("can", 0, True), ("retry", 0), ("can", 0, False)],
    ),
    (
        "no traffic at all: the floor allows one",
        {"ratio": 0.2},
        [("can", 0, True), ("retry", 0), ("can", 0, False)],
    ),
    (
        "ratio of recent requests",
        {"ratio": 0.2},
        # 10 requests: 0.2 * 10 + 1 = 3 retries
        [
            *[("req", 0)] * 10,
            ("retry", 0),
            ("retry", 0),
            ("can", 0, True),
            ("retry", 0),
            ("can", 0, False),
        ],
    ),
    (
        "ratio zero leaves only the floor",
        {"ratio": 0.0},
        [*[("req", 0)] * 100, ("can", 0, True), ("retry", 0), ("can", 0, False)],
    ),
    (
        "no floor",
        {"ratio": 0.5, "min_retries_per_s": 0},
        [
            ("can", 0, False),
            ("req", 0),
            ("can", 0, False),
            ("req", 0),
            ("can", 0, True),
            ("retry", 0),
            ("can", 0, False),
        ],
    ),
    (
        "old retries roll off with the window",
        {"ratio": 0.2},
        [("retry", 0), ("can", 5, False), ("can", 10.5, True)],
    ),
    (
        "old requests roll off too",
        {"ratio": 0.5, "min_retries_per_s": 0},
        [*[("req", 0)] * 4, ("can", 9, True), ("can", 10.5, False)],
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "events"), [c[1:] for c in BUDGET_CASES], ids=[c[0] for c in BUDGET_CASES]
)
def test_budget(kwargs: dict[str, float], events: list[tuple[Any, ...]]) -> None:
    budget = RetryBudget(**kwargs)
    for i, event in enumerate(events):
        if event[0] == "req":
            budget.record_request(event[1])
        elif event[0] == "retry":
            budget.record_retry(event[1])
        else:
            assert budget.can_retry(event[1]) is event[2], f"event {i} {event}"


def test_budget_reconfigure() -> None:
    budget = RetryBudget(0.0, min_retries_per_s=0)
    for _ in range(10):
        budget.record_request(0)
    assert not budget.can_retry(0)
    budget.reconfigure(0.5)
    assert budget.can_retry(0)


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": -0.1}, {"ratio": 0.2, "window_s": 0}, {"ratio": 0.2, "min_retries_per_s": -1}],
)
def test_budget_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RetryBudget(**kwargs)
