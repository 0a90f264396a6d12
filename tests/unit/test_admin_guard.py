"""The admin port's budget of failed authentications, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.admin.guard import AdminAuthGuard
from gateway.core.gcra import Rate
from gateway.logs import get_logger
from gateway.metrics import Metrics


def _guard(**kwargs: Any) -> tuple[AdminAuthGuard, Metrics]:
    metrics = Metrics()
    return AdminAuthGuard(metrics, get_logger("test"), **kwargs), metrics


def _count(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_admin_auth_failures_total", {"result": result}
    )
    return value or 0.0


def test_refused_after_the_budget_and_counted_without_the_address() -> None:
    guard, metrics = _guard(rate=Rate(3, 30.0, 3))  # 3 at once, then one every 10 s
    for _ in range(3):
        assert guard.wait_s("10.0.0.1", 0.0) == 0.0
        guard.failed("10.0.0.1", 0.0)
    assert guard.wait_s("10.0.0.1", 1.0) == pytest.approx(9.0)
    assert guard.wait_s("10.0.0.2", 1.0) == 0.0  # another address is untouched
    assert guard.wait_s("10.0.0.1", 10.0) == 0.0
    assert _count(metrics, "unauthorized") == 3
    assert _count(metrics, "throttled") == 1
    text = metrics.exposition().decode()
    assert "10.0.0." not in text


def test_one_line_a_burst_and_a_spray_of_addresses_is_capped() -> None:
    guard, _ = _guard(rate=Rate(1, 60.0, 1))
    with capture_logs() as logs:
        guard.failed("10.0.0.1", 0.0)  # its budget is spent: one line
        for t in range(5):  # refused, never failed again: no more lines
            guard.wait_s("10.0.0.1", float(t))
        # a spray: each address runs out at once, but the lines are capped
        for n in range(1000):
            guard.failed(f"10.1.{n // 256}.{n % 256}", 1.0)
    lines = [e for e in logs if e["event"] == "admin_auth_throttled"]
    assert lines[0]["client_ip"] == "10.0.0.1"
    assert 2 <= len(lines) <= 20
    # the next line that passes says how many were left out
    with capture_logs() as later:
        guard.failed("10.2.0.1", 100.0)
    assert later[0]["suppressed"] == 1000 - (len(lines) - 1)


def test_memory_is_bounded_by_max_clients() -> None:
    guard, _ = _guard(rate=Rate(1, 3600.0, 1), max_clients=100)
    for n in range(10_000):
        guard.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", float(n))
    assert len(guard) == 100
