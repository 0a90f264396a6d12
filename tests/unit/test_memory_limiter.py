"""Memory backend: key representation, reclaim of refilled keys, the hard cap under a spray."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.core.gcra import Rate
from gateway.stores.limiter import MAX_KEY_CHARS, Check
from gateway.stores.memory.limiter import MemoryLimiter, compact_key


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


RATE = Rate(10, 1.0, 5)  # T = 0.1 s, tolerance 0.5 s


def ip(i: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + i))


def allowed(lim: MemoryLimiter, key: str, n: int, rate: Rate = RATE, policy: str = "p") -> int:
    return sum(lim.decide_local([Check(policy, rate, key)])[0].allowed for _ in range(n))


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("203.0.113.7", 0xCB007107),
        ("0.0.0.0", 0),
        ("255.255.255.255", 0xFFFFFFFF),
        ("::1", (1 << 128) | 1),
        ("2001:db8::", (1 << 128) | (0x20010DB8 << 96)),
        ("::ffff:1.2.3.4", (1 << 128) | 0xFFFF01020304),
        ("2001:db8:1:2::/64", (64 << 129) | (1 << 128) | (0x20010DB800010002 << 64)),
        ("2001:db8:1:2::/x", "2001:db8:1:2::/x"),
        ("2001:db8:1:2::/²", "2001:db8:1:2::/²"),
        ("1.2.3.4|api", "1.2.3.4|api"),
        ("h:abcdef", "h:abcdef"),
        ("\u0661.2.3.4", "\u0661.2.3.4"),
        ("1.2.3.\x004", "1.2.3.\x004"),
        ("::\u00e91", "::\u00e91"),
        ("route:api", "route:api"),
        ("1.2.3", "1.2.3"),
        ("1.2.3.4.5", "1.2.3.4.5"),
        ("01.2.3.4", "01.2.3.4"),
        ("abc:def", "abc:def"),
        ("", ""),
        ("x" * MAX_KEY_CHARS, "x" * MAX_KEY_CHARS),
    ],
)
def test_compact_key(key: str, expected: int | str) -> None:
    assert compact_key(key) == expected


def test_long_keys_are_digested_and_still_distinct() -> None:
    a, b = "a" * 10_000, "a" * 9_999 + "b"
    ka, kb = compact_key(a), compact_key(b)
    assert isinstance(ka, str)
    assert len(ka) <= MAX_KEY_CHARS
    assert ka != kb
    assert ka == compact_key("a" * 10_000)


def test_ipv4_and_mapped_ipv6_keys_do_not_share_a_bucket() -> None:
    lim = MemoryLimiter({"p": RATE}, clock=FakeClock())
    assert allowed(lim, "1.2.3.4", 10) == 5
    assert allowed(lim, "::102:304", 10) == 5
    assert allowed(lim, "::ffff:1.2.3.4", 10) == 5


def test_burst_then_refill_with_fake_clock() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, clock=clock)
    assert allowed(lim, "1.1.1.1", 8) == 5
    [d] = lim.decide_local([Check("p", RATE, "1.1.1.1")])
    assert d.retry_after_s == pytest.approx(0.1)
    clock.t += 0.25
    assert allowed(lim, "1.1.1.1", 8) == 2


async def test_decide_and_peek_are_the_same_answer_without_io() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, clock=clock)
    checks = [Check("p", RATE, "k")]
    assert lim.decide_local(checks) is not None
    assert (await lim.peek(checks))[0].remaining == 3
    assert (await lim.peek(checks))[0].remaining == 3
    assert (await lim.decide(checks))[0].remaining == 3
    assert lim.peek_local(checks)[0].remaining == 2


def test_refilled_keys_are_reclaimed_by_a_sweep() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, clock=clock)
    for i in range(1000):
        allowed(lim, ip(i), 1)
    assert lim.key_count == 1000
    clock.t += 0.05  # not refilled yet
    assert lim.sweep() == 0
    clock.t += 0.06  # T = 0.1 has passed: every bucket is full again
    assert lim.sweep(300) == 300  # bounded work per call
    assert lim.sweep() == 700
    assert lim.key_count == 0


def test_insertions_reclaim_refilled_keys_incrementally() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, clock=clock)
    for i in range(1000):
        allowed(lim, ip(i), 1)
    clock.t += 1.0  # all 1000 refilled, nothing has visited them yet
    for i in range(1000, 1600):
        allowed(lim, ip(i), 1)
        # each insertion visits two entries and reclaims at least one stale key
        assert lim.key_count <= 1000
    for i in range(1600, 2000):
        allowed(lim, ip(i), 1)
    assert lim.key_count == 1000  # only the live keys are left


def test_a_reclaimed_key_answers_as_before() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, clock=clock)
    allowed(lim, "9.9.9.9", 3)
    clock.t += 0.5
    lim.sweep()
    assert lim.key_count == 0
    assert allowed(lim, "9.9.9.9", 10) == 5


def test_cap_holds_under_a_spray() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"a": RATE, "b": RATE}, max_keys=1000, clock=clock)
    for i in range(5000):
        key = ip(i)
        lim.decide_local([Check("a", RATE, key), Check("b", RATE, key)])
        assert lim.key_count <= 1000
    assert lim.key_count == 1000


@pytest.mark.parametrize(("spray_requests", "later"), [(1, 0.0), (5, 0.0), (5, 0.05)])
def test_an_evicted_attacker_does_not_regain_its_burst(spray_requests: int, later: float) -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, max_keys=1000, clock=clock)
    attacker = "198.51.100.66"
    assert allowed(lim, attacker, 10) == 5  # exhausted: TAT = now + 0.5
    clock.t += later
    # spray 3000 other addresses (each using spray_requests of its budget)
    for i in range(3000):
        allowed(lim, ip(i), spray_requests)
        assert lim.key_count <= 1000
    if later:
        # the sprayers' TATs are later than the attacker's: it is the one closest to
        # refilled, so it has been evicted
        assert compact_key(attacker) not in lim._tables["p"].tats
    [d] = lim.decide_local([Check("p", RATE, attacker)])
    assert not d.allowed
    # at least the wait it had (more if its ghost slot holds a later evicted TAT)
    assert d.retry_after_s >= 0.1 - later - 1e-9
    # and it only gets what refills with time
    clock.t += 0.2
    assert allowed(lim, attacker, 10) <= 2


def test_an_evicted_partial_user_comes_back_with_at_most_what_it_had() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, max_keys=1000, clock=clock)
    user = "198.51.100.7"
    assert allowed(lim, user, 3) == 3  # 2 left
    for i in range(3000):
        allowed(lim, ip(i), 5)  # heavier keys: the user is closest to refilled
    assert compact_key(user) not in lim._tables["p"].tats
    assert allowed(lim, user, 10) <= 2


def test_new_clients_keep_their_budget_during_a_spray() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, max_keys=1000, clock=clock)
    for i in range(20_000):  # 20 x the cap, at 10,000 new addresses a second
        allowed(lim, ip(i), 1)
        clock.t += 0.0001
    remaining = [
        lim.decide_local([Check("p", RATE, ip(100_000 + i))])[0].remaining for i in range(500)
    ]
    assert remaining == [4] * 500


def test_a_heavier_spray_costs_few_new_clients_anything() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, max_keys=1000, clock=clock)
    for i in range(10_000):  # 10 x the cap, 2,000 addresses a second, 3 requests each
        allowed(lim, ip(i), 3)
        clock.t += 0.0005
    remaining = [
        lim.decide_local([Check("p", RATE, ip(100_000 + i))])[0].remaining for i in range(500)
    ]
    assert remaining.count(4) >= 450


def test_cycling_through_more_keys_than_the_cap_gains_almost_nothing() -> None:
    clock = FakeClock()  # frozen: no refill at all
    lim = MemoryLimiter({"p": RATE}, max_keys=1000, clock=clock)
    passes = []
    for _ in range(3):
        passes.append(sum(allowed(lim, ip(i), 5) for i in range(20_000)))
    # with unbounded memory each pass would admit 0 after the first; with evictions
    # that forget, each pass would admit 100,000 again
    assert passes[0] <= 20_000
    assert passes[1] + passes[2] <= 2_000


def test_pressure_fades_once_the_ghost_tats_pass() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, max_keys=1000, clock=clock)
    for i in range(3000):
        allowed(lim, ip(i), 5)
    clock.t += 0.5  # tolerance: every remembered TAT is in the past
    assert [allowed(lim, ip(50_000 + i), 10) for i in range(100)] == [5] * 100


def test_reconfigure_keeps_unchanged_and_drops_changed_policies() -> None:
    clock = FakeClock()
    other = Rate(100, 1.0, 3)
    lim = MemoryLimiter({"keep": RATE, "change": RATE, "gone": RATE}, clock=clock)
    for policy in ("keep", "change", "gone"):
        assert allowed(lim, "k", 5, RATE, policy) == 5
    assert lim.key_count == 3
    lim.reconfigure({"keep": Rate(10, 1.0, 5), "change": other, "new": RATE})
    assert lim.key_count == 1
    assert allowed(lim, "k", 5, RATE, "keep") == 0  # state kept
    assert allowed(lim, "k", 5, other, "change") == 3  # fresh under its new rate
    assert allowed(lim, "k", 5, RATE, "new") == 5


def test_unknown_policy_gets_a_table_lazily() -> None:
    lim = MemoryLimiter({}, clock=FakeClock())
    assert allowed(lim, "k", 9, RATE, "late") == 5


async def test_background_sweep_reclaims_idle_keys() -> None:
    clock = FakeClock()
    lim = MemoryLimiter({"p": RATE}, clock=clock, sweep_interval_s=0.01)
    for i in range(100):
        allowed(lim, ip(i), 1)
    clock.t += 1
    await lim.start()
    try:
        for _ in range(100):
            if lim.key_count == 0:
                break
            await __import__("asyncio").sleep(0.01)
        assert lim.key_count == 0
    finally:
        await lim.close()
    await lim.close()  # idempotent


def test_invalid_max_keys() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        MemoryLimiter({}, max_keys=0)


@pytest.mark.parametrize("key", ["203.0.113.7", "2001:db8::/64", "h:some-api-key"])
def test_decide_key_answers_and_consumes_as_decide_local(key: str) -> None:
    clock = FakeClock()
    policies = (("burst", Rate(10, 1.0, 3)), ("hourly", Rate(5, 3600.0, 5)))
    by_key = MemoryLimiter(dict(policies), clock=clock)
    by_checks = MemoryLimiter(dict(policies), clock=clock)
    seen = []
    for step in range(12):
        clock.t += 0.05 * (step % 3)
        got = by_key.decide_key(policies, key)
        assert got == by_checks.decide_local([Check(n, r, key) for n, r in policies])
        seen.append(tuple(d.allowed for d in got))
    # both budgets were used up at some point: the comparison covered refusals too
    assert seen[0] == (True, True)
    assert (True, False) in seen
    assert sum(hourly for _, hourly in seen) == 5
    assert by_key.key_count == by_checks.key_count == 2


def test_decide_key_keeps_each_key_state_across_many_other_keys() -> None:
    """decide_key remembers recent compact keys in a bounded map; past its bound, keys
    are still decided on their own state (the map only saves parsing them again)."""
    clock = FakeClock()
    policies = (("p", RATE),)
    lim = MemoryLimiter(dict(policies), clock=clock)
    first = [lim.decide_key(policies, "203.0.113.7")[0].allowed for _ in range(RATE.burst)]
    assert all(first)
    for i in range(10_000):  # more distinct keys than the map holds
        assert lim.decide_key(policies, ip(i))[0].allowed
    assert not lim.decide_key(policies, "203.0.113.7")[0].allowed  # its burst is still spent
    assert lim.decide_key(policies, ip(3))[0].remaining == RATE.burst - 2
    assert len(lim._recent) <= 4096  # bounded whatever the number of clients
