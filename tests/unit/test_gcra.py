"""GCRA math: burst, refill, cost, clocks going backwards, gaps, fractional rates."""

from __future__ import annotations

import math

import pytest

from gateway.config import Policy
from gateway.core.gcra import EPSILON_S, Decision, Rate, decide
from gateway.stores.limiter import policy_rate

T0 = 1000.0


def ok(remaining: int, reset_s: float) -> Decision:
    return Decision(allowed=True, remaining=remaining, retry_after_s=0.0, reset_s=reset_s)


# refused rows: retry_after_s and reset_s are checked against the rate and the TAT
REFUSED = Decision(allowed=False, remaining=0, retry_after_s=0.0, reset_s=0.0)


def run(rate: Rate, times: list[float], tat: float | None = None) -> list[Decision]:
    """Decide one request at each time, storing the TAT like a store would."""
    out = []
    for now in times:
        d, new_tat = decide(tat, now, rate)
        if d.allowed:
            tat = new_tat
        else:
            assert new_tat == (now if tat is None else tat)  # refused: unchanged
        out.append(d)
    return out


@pytest.mark.parametrize(
    ("requests", "period_s", "burst"),
    [
        (1, 1.0, 1),
        (20, 1.0, 40),
        (100, 1.0, 200),
        (5000, 3600.0, 5000),
        (3, 1.0, 7),
        (7, 0.2, 2),
        # emission intervals below the 1 us rounding allowance: it must not add requests
        (10_000_000, 1.0, 1000),
        (2_000_000, 1.0, 5),
    ],
)
def test_fresh_key_gets_exactly_burst_at_once(requests: int, period_s: float, burst: int) -> None:
    rate = Rate(requests, period_s, burst)
    decisions = run(rate, [T0] * (burst + 3))
    assert [d.allowed for d in decisions] == [True] * burst + [False] * 3
    assert [d.remaining for d in decisions[:burst]] == list(range(burst - 1, -1, -1))
    refused = decisions[burst]
    assert refused.remaining == 0
    # (sums of a sub-microsecond T at T0 = 1000 s carry float rounding)
    assert refused.retry_after_s == pytest.approx(period_s / requests, rel=1e-3)
    assert refused.reset_s == pytest.approx(period_s * burst / requests, rel=1e-6)


@pytest.mark.parametrize(
    ("rate", "tat", "now", "expected"),
    [
        # fresh key: one used, burst-1 left, full again after one emission interval
        (Rate(10, 1.0, 5), None, T0, ok(4, 0.1)),
        # a TAT in the past is a full bucket
        (Rate(10, 1.0, 5), T0 - 50, T0, ok(4, 0.1)),
        # bucket empty (TAT = now + tau): refused, next passes in T, full in tau
        (Rate(10, 1.0, 5), T0 + 0.5, T0, REFUSED),
        # half used
        (Rate(10, 1.0, 4), T0 + 0.2, T0, ok(1, 0.3)),
        # fractional rate: 5000 per hour = one every 0.72 s
        (Rate(5000, 3600.0, 5000), None, T0, ok(4999, 0.72)),
        (Rate(5000, 3600.0, 5000), T0 + 3600, T0, REFUSED),
        # 1 per 3 s with burst 2, one used 1 s ago: TAT = T0 + 2
        (Rate(1, 3.0, 2), T0 + 2, T0, ok(0, 5.0)),
    ],
)
def test_decision_table(rate: Rate, tat: float | None, now: float, expected: Decision) -> None:
    d, new_tat = decide(tat, now, rate)
    assert d.allowed == expected.allowed
    assert d.remaining == expected.remaining
    if d.allowed:
        assert d.retry_after_s == 0.0
        assert d.reset_s == pytest.approx(expected.reset_s)
        assert new_tat == pytest.approx(now + expected.reset_s)
    else:
        assert d.retry_after_s == pytest.approx(rate.emission_s)
        assert d.reset_s == pytest.approx(tat - now if tat is not None else 0.0)
        assert new_tat == tat


def test_refill_one_request_per_emission_interval() -> None:
    rate = Rate(10, 1.0, 3)  # T = 0.1
    tat = None
    for _ in range(3):
        d, tat = decide(tat, T0, rate)
        assert d.allowed
    d, _ = decide(tat, T0 + 0.05, rate)
    assert not d.allowed
    assert d.retry_after_s == pytest.approx(0.05)
    d, tat = decide(tat, T0 + 0.1, rate)  # exactly one interval later: one more
    assert d.allowed
    assert d.remaining == 0
    d, _ = decide(tat, T0 + 0.1, rate)
    assert not d.allowed
    # after a long pause the bucket is full again, not fuller
    decisions = run(rate, [T0 + 100] * 5, tat)
    assert [x.allowed for x in decisions] == [True, True, True, False, False]


def test_sustained_rate_over_a_long_run() -> None:
    rate = Rate(20, 1.0, 40)
    # a request every 10 ms for 60 s (100/s offered): burst + 20/s pass
    times = [T0 + i * 0.01 for i in range(6000)]
    allowed = sum(d.allowed for d in run(rate, times))
    assert allowed in (40 + 1199, 40 + 1200)


@pytest.mark.parametrize(("cost", "passes"), [(1, 6), (2, 3), (3, 2), (4, 1), (6, 1)])
def test_cost_above_one(cost: int, passes: int) -> None:
    rate = Rate(2, 1.0, 6)
    tat = None
    allowed = 0
    for _ in range(10):
        d, new_tat = decide(tat, T0, rate, cost)
        if d.allowed:
            tat, allowed = new_tat, allowed + 1
    assert allowed == passes


def test_cost_refused_reports_wait_for_that_cost() -> None:
    rate = Rate(2, 1.0, 6)  # T = 0.5
    _, tat = decide(None, T0, rate, 5)  # one unit left
    d, _ = decide(tat, T0, rate, 3)
    assert not d.allowed
    assert d.retry_after_s == pytest.approx(1.0)  # two more units: 2 * 0.5
    d, _ = decide(tat, T0, rate, 1)
    assert d.allowed
    assert d.remaining == 0


def test_cost_above_burst_never_passes() -> None:
    rate = Rate(2, 1.0, 3)
    d, tat = decide(None, T0, rate, 4)
    assert not d.allowed
    assert tat == T0
    d, _ = decide(None, T0 + 10_000, rate, 4)
    assert not d.allowed


@pytest.mark.parametrize("cost", [0, -1])
def test_cost_below_one_is_an_error(cost: int) -> None:
    with pytest.raises(ValueError, match="cost"):
        decide(None, T0, Rate(1, 1.0, 1), cost)


@pytest.mark.parametrize("step_back", [0.001, 0.5, 10.0, 1e6])
def test_clock_going_backwards_grants_nothing_extra(step_back: float) -> None:
    rate = Rate(10, 1.0, 5)
    tat = None
    for _ in range(5):
        d, tat = decide(tat, T0, rate)
        assert d.allowed
    assert tat is not None
    # the clock steps back: still refused, and the wait grows by the step
    d, new_tat = decide(tat, T0 - step_back, rate)
    assert not d.allowed
    assert new_tat == tat
    assert d.retry_after_s == pytest.approx(0.1 + step_back)
    # over a backwards-stepping sequence the total never exceeds burst + elapsed refill
    tat2 = None
    allowed = 0
    for now in [T0, T0 - 1, T0 - 2, T0 + 0.05, T0 - 3, T0 + 0.1]:
        d, nt = decide(tat2, now, rate)
        if d.allowed:
            tat2, allowed = nt, allowed + 1
    assert allowed <= 5 + 1


@pytest.mark.parametrize("gap", [2.0, 3600.0, 86_400.0 * 365, 1e9])
def test_huge_gap_is_a_full_bucket_not_more(gap: float) -> None:
    rate = Rate(20, 1.0, 40)
    decisions = run(rate, [T0] * 40 + [T0 + gap] * 41)
    assert sum(d.allowed for d in decisions) == 80
    assert decisions[-1].allowed is False


def test_fractional_rate_5000_per_hour_refills_every_072_s() -> None:
    rate = Rate(5000, 3600.0, 1)
    assert rate.emission_s == pytest.approx(0.72)
    d, tat = decide(None, T0, rate)
    assert d.allowed
    d, _ = decide(tat, T0 + 0.71, rate)
    assert not d.allowed
    assert d.retry_after_s == pytest.approx(0.01)
    d, _ = decide(tat, T0 + 0.72, rate)
    assert d.allowed


def test_fractional_rate_one_per_three_seconds() -> None:
    rate = Rate(3, 10.0, 3)  # one every 3.333... s
    times = [T0 + i * (10 / 3) for i in range(300)]
    # on time exactly: every request passes despite float rounding over 300 steps
    assert all(d.allowed for d in run(rate, times))


def test_long_burst_at_real_monotonic_scale_is_exact() -> None:
    # large clock values and a long burst: rounding must not cost the last request
    rate = Rate(10_000, 1.0, 20_000)
    now = 1.7e6 + 0.123456
    decisions = run(rate, [now] * 20_001)
    assert sum(d.allowed for d in decisions) == 20_000


@pytest.mark.parametrize("early", [10 * EPSILON_S, 0.001, 0.099])
def test_a_request_measurably_early_is_refused(early: float) -> None:
    rate = Rate(10, 1.0, 1)
    _, tat = decide(None, T0, rate)
    d, _ = decide(tat, T0 + 0.1 - early, rate)
    assert not d.allowed
    assert d.retry_after_s == pytest.approx(early)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"requests": 0, "period_s": 1.0, "burst": 1}, "requests"),
        ({"requests": 1, "period_s": 0.0, "burst": 1}, "period_s"),
        ({"requests": 1, "period_s": math.inf, "burst": 1}, "period_s"),
        ({"requests": 1, "period_s": 1.0, "burst": 0}, "burst"),
    ],
)
def test_invalid_rate(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Rate(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (Policy(requests=20, period_s=1, burst=40), Rate(20, 1.0, 40)),
        (Policy(requests=5000, period_s=3600), Rate(5000, 3600.0, 5000)),
        (Policy(requests=30, period_s=0.5, key="route"), Rate(30, 0.5, 30)),
    ],
)
def test_policy_rate(policy: Policy, expected: Rate) -> None:
    rate = policy_rate(policy)
    assert rate == expected
    assert isinstance(rate.period_s, float)


def test_remaining_never_exceeds_the_bucket_at_extreme_rates() -> None:
    # 10 M/s with a 10 M burst: T is 0.1 us, far below the rounding allowance
    rate = Rate(10_000_000, 1.0, 10_000_000)
    d, tat = decide(None, 1.7e6, rate)
    assert d.remaining == 10_000_000 - 1
    d, _ = decide(tat, 1.7e6 + 1e-6, rate)
    assert d.allowed
    assert d.remaining <= 10_000_000 - 1


def test_rate_properties() -> None:
    rate = Rate(20, 1.0, 40)
    assert rate.emission_s == pytest.approx(0.05)
    assert rate.tolerance_s == pytest.approx(2.0)
