"""``redis``: ``PING`` on the client given to the monitor (only when one is given)."""

from __future__ import annotations

import time
from typing import Any

from gateway.config import RedisHealth
from gateway.core.health import ComponentHealth, Status
from gateway.health.checks.bounded import Bounded, Report, describe

__all__ = ["check_redis"]


async def check_redis(redis: Any, bounded: Bounded, report: Report, cfg: RedisHealth) -> None:
    """One round of the check of the shared Redis."""
    t0 = time.perf_counter()
    latency_ms: float | None = None
    try:
        await bounded(redis.ping(), cfg.timeout_s)
    except TimeoutError:
        status, message = Status.UNHEALTHY, f"timeout after {cfg.timeout_s:g}s"
    except Exception as exc:  # redis-py's errors, OSError, ...
        status, message = Status.UNHEALTHY, describe(exc)
    else:
        latency_ms = (time.perf_counter() - t0) * 1000
        status, message = Status.HEALTHY, "ok"
    report(
        ComponentHealth("redis", status, cfg.critical, latency_ms, message, time.time()),
        time.perf_counter() - t0,
    )
