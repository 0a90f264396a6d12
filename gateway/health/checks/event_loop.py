"""``event_loop``: how late a task sleeping one tick wakes.

Above ``liveness.max_event_loop_lag_s`` unhealthy, above half of it degraded.  Never
critical: only ``/livez`` acts on it, through :meth:`LoopLag.current`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.config import Liveness
from gateway.core.health import ComponentHealth, Status, threshold_status
from gateway.health.checks.bounded import Report

__all__ = ["LoopLag"]


class LoopLag:
    """The event loop's lag, measured by a task that sleeps one tick at a time."""

    __slots__ = ("_due", "last_s")

    def __init__(self) -> None:
        # the last lag measured: the gateway's own delay in reading what has come, read
        # by the adaptive concurrency limit with each upstream answer (one float read)
        self.last_s = 0.0
        self._due: float | None = None  # loop time the lag task should wake at

    def current(self) -> float:
        """The last lag measured, or more when the tick is overdue right now."""
        due = self._due
        if due is None:
            return self.last_s
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return self.last_s
        # a loop blocked right now shows as a tick that is overdue
        return max(self.last_s, now - due)

    async def run(
        self, cfg: Liveness, tick: float, report: Report, round_done: Callable[[], None]
    ) -> None:
        """Measure every ``tick`` seconds until cancelled."""
        loop = asyncio.get_running_loop()
        limit = cfg.max_event_loop_lag_s
        try:
            while True:
                due = loop.time() + tick
                self._due = due
                await asyncio.sleep(tick)
                lag = max(0.0, loop.time() - due)
                self.last_s = lag
                status = threshold_status(lag, limit / 2, limit)
                message = f"lag {lag * 1000:.1f} ms"
                if status is not Status.HEALTHY:
                    message += f" (limit {limit:g}s)"
                report(
                    ComponentHealth(
                        "event_loop",
                        status,
                        critical=False,
                        latency_ms=lag * 1000,
                        message=message,
                        last_checked=time.time(),
                        details={"lag_s": round(lag, 6)},
                    ),
                    None,
                )
                round_done()
        finally:
            self._due = None
