"""Health aggregation, readiness, value thresholds and the consecutive-result tracker."""

from __future__ import annotations

import pytest

from gateway.core.health import (
    NOT_CHECKED,
    ComponentHealth,
    Status,
    ThresholdTracker,
    aggregate,
    not_checked,
    ready,
    threshold_status,
)

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY


def _c(status: Status, critical: bool = True, name: str = "x") -> ComponentHealth:
    return ComponentHealth(name, status, critical, 1.0, "", 0.0)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], H),
        ([H], H),
        ([H, H], H),
        ([H, D], D),
        ([D, H, D], D),
        ([H, U], U),
        ([D, U, H], U),
        ([U], U),
    ],
)
def test_aggregate(statuses: list[Status], expected: Status) -> None:
    assert aggregate(_c(s) for s in statuses) is expected


@pytest.mark.parametrize(
    ("components", "draining", "expected"),
    [
        ([], False, True),
        ([], True, False),
        ([(H, True), (D, True)], False, True),
        ([(H, True), (D, True)], True, False),
        ([(U, True)], False, False),
        ([(U, False)], False, True),  # not critical: stays ready
        ([(D, True), (U, False), (H, True)], False, True),
        ([(H, True), (U, True), (U, False)], False, False),
    ],
)
def test_ready(components: list[tuple[Status, bool]], draining: bool, expected: bool) -> None:
    assert ready([_c(s, crit) for s, crit in components], draining) is expected


@pytest.mark.parametrize(
    ("value", "degraded_above", "unhealthy_above", "expected"),
    [
        (0, 100, 1000, H),
        (100, 100, 1000, H),  # "above" is strict
        (101, 100, 1000, D),
        (1000, 100, 1000, D),
        (1001, 100, 1000, U),
        (5, None, None, H),
        (5, None, 4, U),
        (5, 4, None, D),
        (-1, 0, 10, H),
        (0.5, 0.25, 0.75, D),
    ],
)
def test_threshold_status(
    value: float, degraded_above: float | None, unhealthy_above: float | None, expected: Status
) -> None:
    assert threshold_status(value, degraded_above, unhealthy_above) is expected


@pytest.mark.parametrize(
    ("thresholds", "results", "statuses"),
    [
        # the first result decides at once
        ((2, 3), [True], [H]),
        ((2, 3), [False], [U]),
        # healthy -> unhealthy after 3 failures in a row; degraded meanwhile
        ((2, 3), [True, False, False, False], [H, D, D, U]),
        # a success resets the failure run
        ((2, 3), [True, False, False, True, False, False], [H, D, D, H, D, D]),
        # unhealthy -> healthy after 2 successes in a row
        ((2, 3), [False, True, True], [U, U, H]),
        ((2, 3), [False, True, False, True, True], [U, U, U, U, H]),
        # thresholds of one flip at once
        ((1, 1), [True, False, True, False], [H, U, H, U]),
        # recovering, then failing again before the threshold
        ((3, 2), [True, False, False, True, True, True], [H, D, U, U, U, H]),
    ],
)
def test_tracker(thresholds: tuple[int, int], results: list[bool], statuses: list[Status]) -> None:
    tracker = ThresholdTracker(*thresholds)
    assert [tracker.observe(r) for r in results] == statuses
    assert tracker.status is statuses[-1]


def test_tracker_counts_runs() -> None:
    tracker = ThresholdTracker(2, 3)
    for result in (True, False, False):
        tracker.observe(result)
    assert (tracker.successes, tracker.failures) == (0, 2)


def test_tracker_rejects_zero_thresholds() -> None:
    with pytest.raises(ValueError, match="thresholds"):
        ThresholdTracker(0, 1)


def test_not_checked_reads_unhealthy() -> None:
    comp = not_checked("database", critical=True)
    assert comp.status is Status.UNHEALTHY
    assert comp.message == NOT_CHECKED == "not checked yet"
    assert comp.last_checked is None
    assert not ready([comp], draining=False)


def test_to_json() -> None:
    comp = ComponentHealth(
        "database",
        Status.DEGRADED,
        critical=False,
        latency_ms=12.34567,
        message="slow",
        last_checked=1700000000.123456,
        details={"value": 3},
    )
    assert comp.to_json() == {
        "status": "degraded",
        "critical": False,
        "latency_ms": 12.346,
        "message": "slow",
        "last_checked": 1700000000.123,
        "details": {"value": 3},
    }
