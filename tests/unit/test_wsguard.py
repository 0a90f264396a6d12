"""WebSocket admission and closing decisions, and the registry's bookkeeping."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.config import Abuse
from gateway.core.wsguard import BANNED, DENIED, IDLE, admission, sweep_interval_s, verdict
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.pipeline.wsregistry import WebSocketRegistry
from gateway.stores.memory.bans import MemoryBanStore


@pytest.mark.parametrize(
    ("denied", "banned", "idle_s", "expected"),
    [
        (False, False, 0.0, None),
        (False, False, 299.9, None),
        (False, False, 300.0, IDLE),
        (False, False, 1e9, IDLE),
        (False, True, 0.0, BANNED),
        (True, False, 0.0, DENIED),
        (True, True, 1e9, DENIED),  # the reason an operator acted on comes first
        (False, True, 1e9, BANNED),
    ],
)
def test_verdict(denied: bool, banned: bool, idle_s: float, expected: object) -> None:
    assert verdict(denied=denied, banned=banned, idle_s=idle_s, idle_timeout_s=300) == expected


def test_close_codes() -> None:
    assert BANNED[0] == DENIED[0] == 1008  # policy violation (RFC 6455 7.4.1)
    assert IDLE[0] == 1001  # going away


@pytest.mark.parametrize(
    ("client_open", "upstream_open", "expected"),
    [
        (0, 0, None),
        (31, 99, None),
        (32, 0, "client"),
        (0, 100, "upstream"),
        (32, 100, "client"),
        (33, 101, "client"),
    ],
)
def test_admission(client_open: int, upstream_open: int, expected: str | None) -> None:
    assert admission(client_open, 32, upstream_open, 100) == expected


@pytest.mark.parametrize(
    ("idle_timeout_s", "expected"),
    [(300, 0.5), (2, 0.5), (1, 0.25), (0.4, 0.1), (0.01, 0.02)],
)
def test_sweep_interval(idle_timeout_s: float, expected: float) -> None:
    assert sweep_interval_s(idle_timeout_s) == pytest.approx(expected)


def test_the_registry_counts_by_key_and_upstream_and_forgets_what_ended() -> None:
    reg = WebSocketRegistry(get_logger())
    a = ipaddress.ip_address("10.0.0.1")
    socks = [reg.add("10.0.0.1", a, "api") for _ in range(3)]
    other = reg.add("10.0.0.2", None, "bot")
    assert reg.open_for("10.0.0.1") == 3
    assert reg.open_to("api") == 3
    assert reg.open_to("bot") == 1
    assert len(reg) == 4
    for sock in [*socks, other]:
        reg.remove(sock)
        reg.remove(sock)  # twice is harmless
    assert (reg.open_for("10.0.0.1"), reg.open_to("api"), len(reg)) == (0, 0, 0)
    assert reg._by_key == {}
    assert reg._per_upstream == {}


async def test_a_ban_marks_only_that_clients_sockets_and_spares_the_allow_listed() -> None:
    """A ban during the handshakes (no WebSocket yet) is kept and applied on attach."""
    bans = MemoryBanStore(Abuse(), metrics=Metrics())
    reg = WebSocketRegistry(get_logger())
    bans.add_ban_listener(lambda key: reg.on_ban(key, bans))
    mine = reg.add("10.0.0.1", None, "api")
    exempt = reg.add("10.0.0.1", None, "api", exempt=True)
    theirs = reg.add("10.0.0.2", None, "api")
    for _ in range(2):
        bans.report("10.0.0.1", "suspicious_path")
    assert bans.banned("10.0.0.1") is not None
    assert mine.closing == BANNED
    assert exempt.closing is None
    assert theirs.closing is None


def test_a_shadow_ban_closes_nothing() -> None:
    bans = MemoryBanStore(Abuse(mode="shadow"), metrics=Metrics())
    reg = WebSocketRegistry(get_logger())
    bans.add_ban_listener(lambda key: reg.on_ban(key, bans))
    sock = reg.add("10.0.0.1", None, "api")
    for _ in range(2):
        bans.report("10.0.0.1", "suspicious_path")
    assert sock.closing is None
