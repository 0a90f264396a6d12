"""Circuit breaker state machine, driven by tables of events on a fake clock."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import CircuitBreaker
from gateway.core.breaker import Breaker, RollingCounts, State

CL, OP, HO = State.CLOSED, State.OPEN, State.HALF_OPEN

# A step: ("ok" | "fail", t) records an outcome; ("acq", t, bool) expects acquire();
# ("state", t, State) expects state(); ("after", t, seconds) expects retry_after();
# ("release", t) gives an acquired request back without a verdict.
Step = tuple[Any, ...]


def _cfg(**kw: Any) -> CircuitBreaker:
    base: dict[str, Any] = {
        "consecutive_failures": 100,
        "failure_ratio": 0.5,
        "min_requests": 4,
        "window_s": 10,
        "open_s": 5,
        "half_open_requests": 2,
    }
    base.update(kw)
    return CircuitBreaker(**base)


def _run(breaker: Breaker, steps: list[Step]) -> None:
    for i, step in enumerate(steps):
        kind, t = step[0], step[1]
        where = f"step {i} {step}"
        if kind == "ok":
            breaker.record(t, failure=False)
        elif kind == "fail":
            breaker.record(t, failure=True)
        elif kind == "release":
            breaker.release(t)
        elif kind == "acq":
            assert breaker.acquire(t) is step[2], where
        elif kind == "state":
            assert breaker.state(t) is step[2], where
        elif kind == "after":
            assert breaker.retry_after(t) == pytest.approx(step[2]), where
        else:  # pragma: no cover - a typo in a table
            raise AssertionError(where)


OPEN_AT_0: list[Step] = [("fail", 0), ("fail", 0), ("fail", 0)]  # with consecutive_failures=3

CASES: list[tuple[str, dict[str, Any], list[Step], list[tuple[State, State]]]] = [
    (
        "consecutive failures open",
        {"consecutive_failures": 3},
        [
            ("fail", 0),
            ("fail", 0),
            ("state", 0, CL),
            ("fail", 0),
            ("state", 0, OP),
            ("acq", 1, False),
        ],
        [(CL, OP)],
    ),
    (
        "a success breaks the run",
        {"consecutive_failures": 3, "min_requests": 100},
        [("fail", 0), ("fail", 0), ("ok", 0), ("fail", 0), ("fail", 0), ("state", 0, CL)],
        [],
    ),
    (
        "ratio opens once min_requests are in the window",
        {},
        [("ok", 0), ("fail", 0), ("ok", 0), ("state", 0, CL), ("fail", 0), ("state", 0, OP)],
        [(CL, OP)],
    ),
    (
        "ratio below min_requests stays closed",
        {},
        [("fail", 0), ("ok", 0), ("fail", 0), ("state", 0, CL)],
        [],
    ),
    (
        "ratio under failure_ratio stays closed",
        {},
        [("ok", 0), ("ok", 0), ("ok", 0), ("fail", 0), ("fail", 0), ("state", 0, CL)],
        [],
    ),
    (
        "a success never opens, even at the ratio",
        {"min_requests": 2},
        [("fail", 0), ("ok", 0), ("state", 0, CL)],
        [],
    ),
    (
        "inside the window the old failures still count",
        {},
        [("fail", 0), ("fail", 0), ("fail", 0), ("ok", 5), ("fail", 9.5), ("state", 9.5, OP)],
        [(CL, OP)],
    ),
    (
        "outcomes older than the window roll off",
        {},
        [("fail", 0), ("fail", 0), ("fail", 0), ("ok", 5), ("fail", 10.5), ("state", 10.5, CL)],
        [],
    ),
    (
        "a long quiet gap empties the window",
        {},
        [("fail", 0), ("fail", 0), ("fail", 0), ("fail", 100), ("state", 100, CL)],
        [],
    ),
    (
        "open refuses until open_s, then reads half-open",
        {"consecutive_failures": 3},
        [
            *OPEN_AT_0,
            ("acq", 1, False),
            ("after", 1, 4),
            ("state", 4.9, OP),
            ("state", 5, HO),
            ("after", 5, 0),
        ],
        [(CL, OP)],
    ),
    (
        "reading the state never transitions",
        {"consecutive_failures": 3},
        [*OPEN_AT_0, ("state", 6, HO), ("state", 7, HO), ("ok", 7), ("state", 7, HO)],
        [(CL, OP)],
    ),
    (
        "outcomes recorded while open are ignored",
        {"consecutive_failures": 3},
        [
            *OPEN_AT_0,
            ("ok", 1),
            ("ok", 1),
            ("ok", 1),
            ("fail", 2),
            ("state", 4, OP),
            ("acq", 5, True),
        ],
        [(CL, OP), (OP, HO)],
    ),
    (
        "half-open: all trials succeed -> closed",
        {"consecutive_failures": 3},
        [
            *OPEN_AT_0,
            ("acq", 5, True),
            ("state", 5, HO),
            ("acq", 5, True),
            ("ok", 5.1),
            ("state", 5.1, HO),
            ("ok", 5.2),
            ("state", 5.2, CL),
            ("acq", 5.2, True),
        ],
        [(CL, OP), (OP, HO), (HO, CL)],
    ),
    (
        "closing resets the window",
        {"consecutive_failures": 3, "window_s": 60},
        [
            ("ok", 0),
            ("fail", 0),
            *OPEN_AT_0,  # opens on the consecutive rule with 4 outcomes, 3 failed, in the window
            ("acq", 5, True),
            ("acq", 5, True),
            ("ok", 5),
            ("ok", 5),
            ("fail", 6),  # 1 of 1 in a fresh window: below min_requests
            ("state", 6, CL),
        ],
        [(CL, OP), (OP, HO), (HO, CL)],
    ),
    (
        "half-open: a failure opens again for open_s",
        {"consecutive_failures": 3},
        [
            *OPEN_AT_0,
            ("acq", 5, True),
            ("ok", 5.5),
            ("acq", 5.5, True),
            ("fail", 6),
            ("state", 6, OP),
            ("acq", 6, False),
            ("after", 6, 5),
            ("acq", 10.9, False),
            ("acq", 11, True),
        ],
        [(CL, OP), (OP, HO), (HO, OP), (OP, HO)],
    ),
    (
        "half-open admits at most half_open_requests trials",
        {"consecutive_failures": 3, "half_open_requests": 1},
        [
            *OPEN_AT_0,
            ("acq", 5, True),
            ("acq", 5, False),
            ("after", 5, 1),
            ("acq", 6, False),
            ("ok", 6.5),
            ("state", 6.5, CL),
        ],
        [(CL, OP), (OP, HO), (HO, CL)],
    ),
    (
        "trials count as admitted, not only in flight",
        {"consecutive_failures": 3, "half_open_requests": 2},
        [
            *OPEN_AT_0,
            ("acq", 5, True),
            ("ok", 5),
            ("acq", 5, True),
            ("acq", 5, False),  # two trials admitted; the second's verdict decides
            ("ok", 5),
            ("state", 5, CL),
        ],
        [(CL, OP), (OP, HO), (HO, CL)],
    ),
    (
        "release gives a trial slot back",
        {"consecutive_failures": 3, "half_open_requests": 1},
        [*OPEN_AT_0, ("acq", 5, True), ("acq", 5, False), ("release", 5), ("acq", 5, True)],
        [(CL, OP), (OP, HO)],
    ),
    (
        "a lost trial is given back after open_s",
        {"consecutive_failures": 3, "half_open_requests": 1},
        [
            *OPEN_AT_0,
            ("acq", 5, True),
            ("acq", 9.9, False),
            ("after", 10, 0),
            ("acq", 10, True),
            ("ok", 10),
            ("state", 10, CL),
        ],
        [(CL, OP), (OP, HO), (HO, CL)],
    ),
    (
        "closed never refuses",
        {},
        [("acq", 0, True), ("after", 0, 0), ("acq", 1000, True)],
        [],
    ),
]


@pytest.mark.parametrize(
    ("cfg", "steps", "transitions"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_sequences(
    cfg: dict[str, Any], steps: list[Step], transitions: list[tuple[State, State]]
) -> None:
    seen: list[tuple[State, State]] = []
    breaker = Breaker(_cfg(**cfg), on_transition=lambda a, b: seen.append((a, b)))
    _run(breaker, steps)
    assert seen == transitions


@pytest.mark.parametrize(
    ("status", "duration", "slow_call_s", "failure"),
    [
        (None, 0.01, None, True),  # connect error / timeout
        (200, 0.01, None, False),
        (404, 0.01, None, False),
        (500, 0.01, None, False),  # not in failure_statuses
        (502, 0.01, None, True),
        (503, 0.01, None, True),
        (504, 0.01, None, True),
        (200, 99.0, None, False),  # no slow_call_s: duration never matters
        (200, 0.5, 1.0, False),
        (200, 1.0, 1.0, False),  # exactly the limit is not slower than it
        (200, 1.01, 1.0, True),
        (404, 2.0, 1.0, True),
    ],
)
def test_is_failure(
    status: int | None, duration: float, slow_call_s: float | None, failure: bool
) -> None:
    breaker = Breaker(_cfg(slow_call_s=slow_call_s))
    assert breaker.is_failure(status, duration) is failure


def test_failure_statuses_are_configurable() -> None:
    breaker = Breaker(_cfg(failure_statuses=[500]))
    assert breaker.is_failure(500, 0)
    assert not breaker.is_failure(503, 0)


def test_slow_calls_feed_the_breaker() -> None:
    breaker = Breaker(_cfg(consecutive_failures=2, slow_call_s=0.5))
    for t in (0.0, 1.0):
        assert breaker.acquire(t)
        breaker.record(t, failure=breaker.is_failure(200, 0.8))
    assert breaker.state(1.0) is State.OPEN


def test_reconfigure_keeps_state_and_applies_new_limits() -> None:
    breaker = Breaker(_cfg(consecutive_failures=2))
    breaker.record(0, failure=True)
    breaker.record(0, failure=True)
    assert breaker.state(0) is State.OPEN
    breaker.reconfigure(_cfg(consecutive_failures=2, open_s=1, failure_statuses=[500]))
    assert breaker.state(0) is State.OPEN
    assert breaker.state(1) is State.HALF_OPEN  # new open_s applies to the open period
    assert breaker.is_failure(500, 0)
    assert breaker.config.open_s == 1


def test_reconfigure_new_window_starts_empty() -> None:
    breaker = Breaker(_cfg())
    for _ in range(3):
        breaker.record(0, failure=True)
    breaker.reconfigure(_cfg(window_s=20))
    breaker.record(0, failure=True)  # 1 in the new window: below min_requests
    assert breaker.state(0) is State.CLOSED


def test_no_observer_is_fine() -> None:
    breaker = Breaker(_cfg(consecutive_failures=1))
    breaker.record(0, failure=True)
    assert breaker.state(0) is State.OPEN


@pytest.mark.parametrize(
    ("adds", "at", "expected"),
    [
        ([(0.0, 1, 0)], 0.0, (1, 0)),
        ([(0.0, 1, 1), (0.5, 1, 0)], 0.9, (2, 1)),
        ([(0.0, 1, 1), (5.0, 1, 0)], 9.99, (2, 1)),  # still inside 10 buckets of 1 s
        ([(0.0, 1, 1), (5.0, 1, 0)], 10.0, (1, 0)),  # bucket of t=0 reused
        ([(0.0, 3, 3)], 1000.0, (0, 0)),
        ([(5.0, 1, 1), (3.0, 1, 0)], 5.0, (2, 1)),  # a clock going back adds to the newest
    ],
)
def test_rolling_counts(
    adds: list[tuple[float, int, int]], at: float, expected: tuple[int, int]
) -> None:
    counts = RollingCounts(10)
    for t, total, marked in adds:
        counts.add(t, total, marked)
    assert counts.sums(at) == expected


def test_rolling_counts_rejects_bad_window() -> None:
    with pytest.raises(ValueError, match="window_s"):
        RollingCounts(0)


def _reference_sums(ops: list[tuple[str, float, int, int]], width: float, n: int) -> list[object]:
    """RollingCounts' rules, the slow way: every add kept with its slot."""
    kept: list[tuple[int, int, int]] = []
    last: int | None = None
    out: list[object] = []
    for op, t, total, marked in ops:
        slot = math.floor(t / width)
        last = slot if last is None else max(slot, last)  # a clock going back: newest slot
        if op == "add":
            kept.append((last, total, marked))
        else:
            live = [(tt, mm) for s, tt, mm in kept if s > last - n]
            out.append((sum(x for x, _ in live), sum(y for _, y in live)))
    return out


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "add", "add", "sums"]),
            st.floats(min_value=-0.5, max_value=3.0),  # steps, some of them backwards
            st.integers(0, 3),
            st.integers(0, 3),
        ),
        max_size=60,
    )
)
def test_rolling_counts_matches_a_reference(steps: list[tuple[str, float, int, int]]) -> None:
    counts = RollingCounts(10, buckets=5)
    t = 100.0
    ops = []
    got: list[object] = []
    for op, step, total, marked in steps:
        t += step
        ops.append((op, t, total, marked))
        if op == "add":
            counts.add(t, total, marked)
        else:
            got.append(counts.sums(t))
    assert got == _reference_sums(ops, 2.0, 5)
