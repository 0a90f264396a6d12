"""The in-memory ban store, with a fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config import Abuse
from gateway.metrics import Metrics
from gateway.stores import make_ban_store
from gateway.stores.bans import Ban
from gateway.stores.memory.bans import MemoryBanStore

T0 = 1_700_000_000.0
IP = "203.0.113.7"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**abuse: Any) -> tuple[MemoryBanStore, Clock, Metrics]:
    clock, metrics = Clock(), Metrics()
    store = make_ban_store(Abuse(**abuse), metrics=metrics, clock=clock)
    assert isinstance(store, MemoryBanStore)
    return store, clock, metrics


def bans_total(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("gateway_bans_total", {"reason": reason})
    return value or 0.0


def active_bans(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("gateway_active_bans")
    assert value is not None
    return value


def ban_of(store: MemoryBanStore, clock: Clock, ip: str = IP) -> Ban:
    """Two suspicious paths (25 + 25) reach the default ban score of 50."""
    store.report(ip, "suspicious_path")
    assert store.banned(ip) is None
    store.report(ip, "suspicious_path")
    ban = store.banned(ip)
    assert ban is not None
    return ban


def test_reaching_the_ban_score_bans() -> None:
    store, _, metrics = make()
    with capture_logs() as logs:
        for _ in range(24):
            store.report(IP, "bad_request")  # 2 points each: 48
        assert store.banned(IP) is None
        assert store.score(IP) == pytest.approx(48)
        store.report(IP, "auth_failure")  # 51
    ban = store.banned(IP)
    assert ban == Ban(IP, "auth_failure", 51.0, T0 + 600, 1, T0)
    assert ban.ban_s == 600
    assert bans_total(metrics, "auth_failure") == 1
    assert bans_total(metrics, "bad_request") == 0
    assert active_bans(metrics) == 1
    assert logs == [
        {
            "event": "ban",
            "log_level": "info",
            "ip": IP,
            "reason": "auth_failure",
            "score": 51.0,
            "ban_s": 600,
            "offences": 1,
            "expires_at": T0 + 600,
        }
    ]


def test_scores_below_threshold_inside_window_do_not_ban_after_sliding() -> None:
    store, clock, _ = make()
    for _ in range(40):
        store.report(IP, "not_found")
    clock.advance(90)  # half of the 40 points still count
    assert store.score(IP) == pytest.approx(20)
    for _ in range(29):
        store.report(IP, "not_found")
    assert store.banned(IP) is None
    store.report(IP, "not_found")
    assert store.banned(IP) is not None


def test_points_outside_the_window_never_count() -> None:
    store, clock, _ = make()
    store.report(IP, "suspicious_path")
    clock.advance(121)
    assert store.score(IP) == 0
    store.report(IP, "suspicious_path")
    assert store.banned(IP) is None


def test_a_ban_resets_the_score_and_events_are_ignored_while_banned() -> None:
    store, clock, metrics = make()
    ban_of(store, clock)
    assert store.score(IP) == 0
    for _ in range(10):
        store.report(IP, "suspicious_path")
    assert store.score(IP) == 0
    assert bans_total(metrics, "suspicious_path") == 1
    clock.advance(601)
    assert store.banned(IP) is None
    store.report(IP, "suspicious_path")
    assert store.score(IP) == 25  # a fresh start after the ban
    assert store.banned(IP) is None


@pytest.mark.parametrize(
    ("max_ban_s", "expected"),
    [
        (86400, [600, 1200, 2400, 4800, 9600]),
        (3000, [600, 1200, 2400, 3000, 3000]),
    ],
)
def test_repeat_bans_escalate_up_to_the_cap(max_ban_s: float, expected: list[float]) -> None:
    store, clock, _ = make(max_ban_s=max_ban_s)
    got = []
    for n, _ in enumerate(expected, 1):
        ban = ban_of(store, clock)
        assert ban.offences == n
        got.append(ban.ban_s)
        clock.advance(ban.ban_s + 1)
    assert got == expected


def test_offences_are_forgotten_two_max_bans_after_the_last_ban() -> None:
    store, clock, _ = make(max_ban_s=3600)
    first = ban_of(store, clock)
    clock.advance(first.ban_s + 2 * 3600 - 1)
    assert ban_of(store, clock).offences == 2
    second = store.banned(IP)
    assert second is not None
    clock.advance(second.ban_s + 2 * 3600 + 1)
    assert ban_of(store, clock).offences == 1


def test_bans_expire() -> None:
    store, clock, metrics = make(ban_s=30)
    ban_of(store, clock)
    clock.advance(29.9)
    assert store.banned(IP) is not None
    clock.advance(0.1)
    with capture_logs() as logs:
        assert store.banned(IP) is None
    assert logs == [{"event": "unban", "log_level": "info", "ip": IP, "by": "expiry"}]
    assert active_bans(metrics) == 0


async def test_expired_bans_are_swept_without_lookups() -> None:
    store, clock, metrics = make(ban_s=30)
    for i in range(20):
        ban_of(store, clock, f"10.0.0.{i}")
    assert active_bans(metrics) == 20
    clock.advance(31)
    store.report("10.9.9.9", "not_found")  # each report sweeps a few
    assert active_bans(metrics) < 20
    assert await store.list_bans() == []
    assert active_bans(metrics) == 0
    assert store.sizes()["bans"] == 0


async def test_background_sweep_runs_after_start() -> None:
    clock, metrics = Clock(), Metrics()
    store = MemoryBanStore(Abuse(ban_s=30), metrics=metrics, clock=clock, sweep_interval_s=0.01)
    await store.start()
    try:
        for i in range(50):
            ban_of(store, clock, f"10.0.1.{i}")
        clock.advance(60)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if active_bans(metrics) == 0:
                break
        assert active_bans(metrics) == 0
        assert store.sizes()["bans"] == 0
    finally:
        await store.close()


async def test_shadow_mode_logs_and_counts_but_blocks_nothing() -> None:
    store, clock, metrics = make(mode="shadow")
    with capture_logs() as logs:
        store.report(IP, "suspicious_path")
        store.report(IP, "suspicious_path")
    assert store.banned(IP) is None
    assert [e["event"] for e in logs] == ["ban_shadow"]
    assert logs[0]["ban_s"] == 600
    assert bans_total(metrics, "suspicious_path") == 1
    assert active_bans(metrics) == 0
    assert await store.list_bans() == []
    assert await store.unban(IP) is False
    # While the ban would be in force, its events are not scored (as in enforce mode).
    for _ in range(4):
        store.report(IP, "suspicious_path")
    assert bans_total(metrics, "suspicious_path") == 1
    clock.advance(601)
    store.report(IP, "suspicious_path")
    store.report(IP, "suspicious_path")
    assert bans_total(metrics, "suspicious_path") == 2


def test_switching_modes() -> None:
    store, clock, _ = make()
    ban_of(store, clock)
    store.reconfigure(Abuse(mode="shadow"))
    assert store.banned(IP) is None
    store.reconfigure(Abuse())
    assert store.banned(IP) is not None  # kept, enforced again
    store.reconfigure(Abuse(mode="shadow"))
    store.report("198.51.100.1", "suspicious_path")
    store.report("198.51.100.1", "suspicious_path")
    store.reconfigure(Abuse())
    assert store.banned("198.51.100.1") is None  # shadow bans never become real
    assert store.sizes()["shadow_bans"] == 0


def test_disabled_never_bans() -> None:
    store, _, metrics = make(enabled=False)
    for _ in range(10):
        store.report(IP, "suspicious_path")
    assert store.banned(IP) is None
    assert store.score(IP) == 0
    assert bans_total(metrics, "suspicious_path") == 0


def test_reconfigured_scores_apply() -> None:
    store, _, _ = make()
    store.reconfigure(Abuse(scores={"not_found": 10}))
    for _ in range(4):
        store.report(IP, "not_found")
    assert store.banned(IP) is None
    store.report(IP, "not_found")
    ban = store.banned(IP)
    assert ban is not None
    assert ban.reason == "not_found"


def test_zero_point_events_do_nothing() -> None:
    store, _, _ = make(scores={"rate_limited": 0})
    for _ in range(100):
        store.report(IP, "rate_limited")
    assert store.score(IP) == 0
    assert store.entry_count == 0


def test_unknown_event_is_an_error() -> None:
    store, _, _ = make()
    with pytest.raises(ValueError, match="unknown abuse event 'scanning'"):
        store.report(IP, "scanning")


async def test_unban() -> None:
    store, clock, metrics = make()
    ban_of(store, clock)
    with capture_logs() as logs:
        assert await store.unban(IP) is True
        assert await store.unban(IP) is False
    assert logs == [{"event": "unban", "log_level": "info", "ip": IP, "by": "admin"}]
    assert store.banned(IP) is None
    assert active_bans(metrics) == 0
    # The offence is remembered: the next ban escalates.
    assert ban_of(store, clock).offences == 2


async def test_list_bans() -> None:
    store, clock, _ = make()
    first = ban_of(store, clock, "192.0.2.1")
    clock.advance(5)
    second = ban_of(store, clock, "2001:db8::1")
    assert await store.list_bans() == [first, second]
    assert second.as_dict() == {
        "ip": "2001:db8::1",
        "reason": "suspicious_path",
        "score": 50.0,
        "expires_at": T0 + 605,
        "offences": 1,
        "banned_at": T0 + 5,
        "ban_s": 600,
    }
    clock.advance(598)
    assert await store.list_bans() == [second]


def test_score_table_stays_bounded_under_a_spray() -> None:
    store, clock, _ = make()
    for i in range(200_000):
        store.report(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "not_found")
        if i % 1000 == 0:
            clock.advance(0.01)
    assert store.entry_count <= 100_000
    assert store.entry_count == 100_000  # the cap, not less: nothing decayed yet
    # The newest addresses are kept, the least recently scored ones made room.
    assert store.score("10.3.13.63") == 1  # i = 199_999
    assert store.score("10.0.0.1") == 0
    # Once the points leave the window, reports sweep stale entries away.
    clock.advance(121)
    for _ in range(2000):
        store.report("192.0.2.200", "not_found")
        clock.advance(0.001)
    assert store.entry_count < 100_000 - 10_000


def test_ban_tables_stay_bounded_under_a_spray() -> None:
    clock, metrics = Clock(), Metrics()
    store = MemoryBanStore(Abuse(), metrics=metrics, clock=clock, max_entries=100, max_bans=50)
    for i in range(1000):
        ip = f"10.1.{i >> 8}.{i & 255}"
        store.report(ip, "suspicious_path")
        store.report(ip, "suspicious_path")
        clock.advance(0.01)
    sizes = store.sizes()
    assert sizes["bans"] <= 50
    assert sizes["offences"] <= 50
    assert sizes["scores"] <= 100
    assert sizes["expiry_heap"] <= 2 * 50 + 1024
    assert bans_total(metrics, "suspicious_path") == 1000
    assert store.banned("10.1.3.231") is not None  # the newest are kept
    assert store.banned("10.1.0.0") is None  # the ones closest to their end made room
