"""The operator page's in-process figures: per-route seconds and the most limited keys."""

from __future__ import annotations

import itertools
import random

import pytest

from gateway.core.window_stats import BOUNDS_S, HISTORY_S, RouteSeries, TopKeys


def _bin_of(value: float) -> float:
    return next(b for b in BOUNDS_S if b >= value)


def test_bounds_are_log_spaced_from_50us_to_60s() -> None:
    assert BOUNDS_S[0] == pytest.approx(50e-6)
    assert BOUNDS_S[-1] >= 60.0
    assert all(b / a == pytest.approx(1.12) for a, b in itertools.pairwise(BOUNDS_S))


def test_a_minute_of_requests_is_counted_with_its_errors_and_percentiles() -> None:
    series = RouteSeries()
    rng = random.Random(3)
    latencies = []
    for second in range(1000, 1060):
        for _ in range(100):
            latency = rng.uniform(0.001, 0.100)
            latencies.append(latency)
            series.record(second + rng.random(), 503 if rng.random() < 0.1 else 200, latency)
    summary = series.summary(1059.5)
    assert summary.requests == 6000
    assert 0.07 < summary.error_ratio < 0.13
    latencies.sort()
    assert summary.p50_s is not None
    assert summary.p99_s is not None
    # Within one bin of the truth (bins are 12 % apart).
    assert latencies[2999] <= summary.p50_s <= _bin_of(latencies[2999]) * 1.001
    assert latencies[5939] <= summary.p99_s <= _bin_of(latencies[5939]) * 1.001


def test_old_seconds_leave_the_window_and_reused_slots_are_reset() -> None:
    series = RouteSeries()
    series.record(100.2, 500, 0.010)
    assert series.summary(100.9).requests == 1
    assert series.summary(159.9).requests == 1
    assert series.summary(160.0).requests == 0  # 61 s later: out of the last minute
    # The same slot, HISTORY_S seconds later, holds the new second only.
    series.record(100.5 + HISTORY_S, 200, 0.020)
    fresh = series.summary(100.9 + HISTORY_S)
    assert (fresh.requests, fresh.errors) == (1, 0)


def test_no_traffic_has_no_percentiles() -> None:
    summary = RouteSeries().summary(50.0)
    assert (summary.requests, summary.p50_s, summary.p99_s, summary.error_ratio) == (
        0,
        None,
        None,
        0.0,
    )


def test_history_covers_five_minutes_in_slices_oldest_first() -> None:
    series = RouteSeries()
    for second in range(400):
        series.record(second + 0.5, 200, 0.001)
    history = series.history(399.5, step_s=10)
    assert len(history) == HISTORY_S // 10
    starts = [start for start, _ in history]
    assert starts == sorted(starts)
    assert starts[-1] == 390
    assert starts[0] == 100
    assert all(s.requests == 10 for _, s in history)


def test_a_latency_past_the_last_bound_lands_in_the_last_bin() -> None:
    series = RouteSeries()
    series.record(1.0, 200, 3600.0)
    assert series.summary(1.0).p99_s == BOUNDS_S[-1]


def test_top_keys_are_the_most_refused_of_the_last_minute() -> None:
    top = TopKeys(window_s=60, slices=6, capacity=50)
    for n in range(30):
        top.add("heavy", 1000 + n)
    for n in range(10):
        top.add("medium", 1000 + n)
    top.add("light", 1030)
    assert top.top(1040) == [("heavy", 30), ("medium", 10), ("light", 1)]
    assert top.top(1040, n=1) == [("heavy", 30)]
    # A minute later the old slices are gone.
    assert top.top(1100) == []


def test_top_keys_stay_bounded_under_a_spray_and_keep_the_heavy_hitter() -> None:
    top = TopKeys(window_s=60, slices=6, capacity=100)
    for n in range(20_000):
        top.add(f"10.0.{n // 256}.{n % 256}", 1000.0 + n / 1000)
        if n % 10 == 0:
            top.add("attacker", 1000.0 + n / 1000)
    assert all(len(counts) <= 100 for _, counts in top._slices)
    first = top.top(1019.0, n=1)[0]
    assert first[0] == "attacker"
    assert first[1] >= 2000  # never under its true count
