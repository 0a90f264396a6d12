"""Calendar quotas (SPEC 11, ``period: hour | day | month``): UTC windows, the decision on
the virtual clock, and the memory limiter at a UTC boundary with injected clocks."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.core.calendar import Window, decide_quota, month_length_s, window_at
from gateway.core.gcra import Rate
from gateway.stores.limiter import Check
from gateway.stores.memory.limiter import MemoryLimiter


def ts(*when: int) -> float:
    """UTC epoch seconds of (year, month, day[, hour[, minute[, second]]])."""
    year, month, day, hour, minute, sec = (*when, 0, 0, 0)[:6]
    return dt.datetime(year, month, day, hour, minute, sec, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("period", "at", "start", "end"),
    [
        ("hour", ts(2026, 12, 7, 10, 59, 59), ts(2026, 12, 7, 10), ts(2026, 12, 7, 11)),
        ("hour", ts(2026, 12, 7, 11), ts(2026, 12, 7, 11), ts(2026, 12, 7, 12)),
        ("day", ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 31), ts(2027, 1, 1)),
        ("day", ts(2027, 1, 1), ts(2027, 1, 1), ts(2027, 1, 2)),
        ("month", ts(2026, 12, 31, 23, 59, 59), ts(2026, 12, 1), ts(2027, 1, 1)),
        ("month", ts(2027, 1, 1), ts(2027, 1, 1), ts(2027, 2, 1)),
        ("month", ts(2028, 2, 29, 12), ts(2028, 2, 1), ts(2028, 3, 1)),
        ("month", ts(1969, 12, 31, 23), ts(1969, 12, 1), ts(1970, 1, 1)),
    ],
)
def test_windows_are_aligned_to_utc(period: str, at: float, start: float, end: float) -> None:
    w = window_at(period, at)
    assert (w.start, w.end) == (start, end)
    assert window_at(period, end).number == w.number + 1
    assert window_at(period, start).number == w.number


def test_month_lengths() -> None:
    assert month_length_s(ts(2027, 2, 10)) == 28 * 86400
    assert month_length_s(ts(2028, 2, 10)) == 29 * 86400
    assert month_length_s(ts(2026, 12, 31, 23, 59)) == 31 * 86400
    assert month_length_s(ts(2026, 11, 1)) == 30 * 86400


def test_a_daily_quota_resets_at_utc_midnight() -> None:
    rate = Rate.quota(3, "day")
    before = ts(2026, 12, 7, 23, 59, 59) + 0.5
    w = window_at("day", before)
    tat = None
    out = []
    for _ in range(4):
        d, tat = decide_quota(tat, before, w, rate)
        out.append(d)
    assert [d.allowed for d in out] == [True, True, True, False]
    assert [d.remaining for d in out] == [2, 1, 0, 0]
    assert out[3].retry_after_s == pytest.approx(0.5)
    assert out[0].reset_s == pytest.approx(0.5)
    after = ts(2026, 12, 8)
    d, tat = decide_quota(tat, after, window_at("day", after), rate)
    assert d.allowed
    assert d.remaining == 2
    assert d.reset_s == 86400


def test_cost_and_a_refusal_that_takes_nothing() -> None:
    rate = Rate.quota(10, "hour")
    now = ts(2026, 12, 7, 10, 30)
    w = window_at("hour", now)
    d, tat = decide_quota(None, now, w, rate, cost=4)
    assert (d.allowed, d.remaining) == (True, 6)
    d, tat = decide_quota(tat, now, w, rate, cost=4)
    assert (d.allowed, d.remaining) == (True, 2)
    d, same = decide_quota(tat, now, w, rate, cost=3)
    assert not d.allowed
    assert same == tat
    d, tat = decide_quota(tat, now, w, rate, cost=2)
    assert (d.allowed, d.remaining) == (True, 0)
    d, _ = decide_quota(None, now, w, rate, cost=11)
    assert not d.allowed


def test_large_quotas_count_exactly() -> None:
    rate = Rate.quota(10_000_000, "hour")
    now = ts(2026, 12, 7, 10, 30)
    w = window_at("hour", now)
    d, tat = decide_quota(None, now, w, rate, cost=9_999_999)
    assert d.remaining == 1
    d, tat = decide_quota(tat, now, w, rate)
    assert (d.allowed, d.remaining) == (True, 0)
    d, _ = decide_quota(tat, now, w, rate)
    assert not d.allowed
    assert Window(0, 0.0, 1.0).number == 0


class Clocks:
    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0

    def advance(self, dt_s: float) -> None:
        self.wall += dt_s
        self.mono += dt_s


@pytest.mark.parametrize(
    ("period", "last_second", "length"),
    [
        ("hour", ts(2026, 12, 7, 10, 59, 59), 3600),
        ("day", ts(2026, 12, 31, 23, 59, 59), 86400),
        ("month", ts(2028, 2, 29, 23, 59, 59), 31 * 86400),
    ],
)
def test_memory_limiter_quota_resets_at_the_boundary(
    period: str, last_second: float, length: int
) -> None:
    clocks = Clocks(last_second - 10)
    rate = Rate.quota(2, period)
    lim = MemoryLimiter(
        {"q": rate}, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall, max_keys=1000
    )
    check = Check("q", rate, "203.0.113.1")
    found = [lim.decide_local([check])[0] for _ in range(3)]
    assert [d.allowed for d in found] == [True, True, False]
    assert found[2].retry_after_s == pytest.approx(11)
    # the key survives a sweep within its window (its TAT is on the virtual clock)
    clocks.advance(10.5)
    lim.sweep()
    assert lim.key_count == 1
    assert not lim.decide_local([check])[0].allowed
    assert lim.decide_key((("q", rate),), "203.0.113.1") == [lim.peek_local([check])[0]]
    clocks.advance(0.5)  # the boundary
    d = lim.decide_local([check])[0]
    assert d.allowed
    assert d.remaining == 1
    assert d.reset_s == pytest.approx(window_at(period, clocks.wall).end - clocks.wall)
    assert window_at(period, clocks.wall).end - window_at(period, clocks.wall).start >= 3600
    # the old window's keys go at the next sweep; the new one stays
    other = Check("q", rate, "203.0.113.2")
    lim.decide_local([other])
    clocks.advance(length + 1)
    assert lim.sweep() == 2
    assert lim.key_count == 0


def test_memory_limiter_decide_key_and_eviction_for_quotas() -> None:
    clocks = Clocks(ts(2026, 12, 7, 12))
    rate = Rate.quota(3, "day")
    lim = MemoryLimiter(
        {"q": rate}, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall, max_keys=1000
    )
    got = [lim.decide_key((("q", rate),), "198.51.100.7", 2)[0] for _ in range(2)]
    assert [(d.allowed, d.remaining) for d in got] == [(True, 1), (False, 0)]
    # more keys than the cap: evictions remember the quota used (ghost), never a fresh one
    for i in range(1100):
        lim.decide_key((("q", rate),), f"k{i}", 3)
    assert lim.key_count <= 1000
    assert not lim.decide_key((("q", rate),), "k5", 1)[0].allowed


def test_a_request_of_the_previous_config_does_not_touch_a_quota_made_by_a_reload() -> None:
    clocks = Clocks(ts(2026, 12, 7, 12))
    rolling, daily = Rate(1, 3600.0, 1), Rate.quota(1, "day")
    lim = MemoryLimiter(
        {"q": daily}, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall, max_keys=1000
    )
    assert lim.decide_key((("q", daily),), "k")[0].allowed
    # a request that read the config before the reload: allowed, nothing spent or dropped
    assert lim.decide_key((("q", rolling),), "k")[0].allowed
    assert lim.decide_local([Check("q", rolling, "k")])[0].allowed
    assert lim.key_count == 1
    assert not lim.decide_key((("q", daily),), "k")[0].allowed
    lim.reconfigure({"q": rolling})
    assert lim.decide_key((("q", rolling),), "k")[0].allowed
    assert lim.decide_key((("q", daily),), "k")[0].allowed  # the old config's, again
    assert not lim.decide_key((("q", rolling),), "k")[0].allowed
