"""The process's drain: one object, two steps, read by every part that serves."""

from __future__ import annotations

from gateway.config import load_text
from gateway.health.monitor import HealthMonitor
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics


def test_the_steps_of_a_drain() -> None:
    life = Lifecycle()
    assert (life.stopping, life.draining) == (False, False)
    life.stop()  # /readyz turns 503; kept-alive connections still serve
    assert (life.stopping, life.draining) == (True, False)
    life.start_draining()
    assert (life.stopping, life.draining) == (True, True)


def test_draining_without_a_stop_first_is_also_not_ready() -> None:
    life = Lifecycle()
    life.start_draining()
    assert life.stopping


def test_the_monitor_reads_the_shared_object() -> None:
    settings = load_text("listen: {port: 8080}\n", environ={})
    life = Lifecycle()
    monitor = HealthMonitor(settings, metrics=Metrics(), lifecycle=life)
    assert not monitor.draining
    life.stop()
    assert monitor.draining
