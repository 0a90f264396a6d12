"""Health of the gateway's dependencies: statuses, aggregation, readiness (pure).

Component names (SPEC section 5): ``upstream:NAME``, ``database``, ``database:CHECK``,
``redis``, ``event_loop``.  Statuses: healthy, degraded, unhealthy.

- Overall status (``/healthz``): the worst status of all components.
- Ready (``/readyz``): not draining, and no *critical* component unhealthy; a degraded
  component, or an unhealthy one that is not critical, leaves the pod ready.
- Before its first check a component reads as unhealthy with the message
  ``"not checked yet"`` (:func:`not_checked`): a pod must not turn ready on the
  strength of checks it has not run.
- Upstream checks use consecutive thresholds (:class:`ThresholdTracker`): the first
  result decides at once, then it takes ``healthy_threshold`` successes in a row to
  turn healthy again and ``unhealthy_threshold`` failures in a row to turn unhealthy.
  A healthy upstream whose latest checks failed (fewer than ``unhealthy_threshold``)
  reads as degraded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "NOT_CHECKED",
    "ComponentHealth",
    "Status",
    "ThresholdTracker",
    "aggregate",
    "not_checked",
    "ready",
    "threshold_status",
]

NOT_CHECKED = "not checked yet"


class Status(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


_RANK = {Status.HEALTHY: 0, Status.DEGRADED: 1, Status.UNHEALTHY: 2}


@dataclass(slots=True)
class ComponentHealth:
    """The latest result of one component's check."""

    name: str
    status: Status
    critical: bool
    latency_ms: float | None
    message: str
    last_checked: float | None  # unix time of the check, None before the first one
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": str(self.status),
            "critical": self.critical,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "message": self.message,
            "last_checked": None if self.last_checked is None else round(self.last_checked, 3),
            "details": self.details,
        }

    def to_public_json(self) -> dict[str, Any]:
        """What the proxy port may show: the name's status and weight, nothing inside
        (a message, a detail or a latency tells an attacker addresses and timings)."""
        return {"status": str(self.status), "critical": self.critical}


def not_checked(name: str, critical: bool) -> ComponentHealth:
    """A component whose first check has not finished yet."""
    return ComponentHealth(name, Status.UNHEALTHY, critical, None, NOT_CHECKED, None)


def aggregate(components: Iterable[ComponentHealth]) -> Status:
    """The worst status among ``components`` (healthy when there are none)."""
    worst = Status.HEALTHY
    for c in components:
        if c.status is Status.UNHEALTHY:
            return Status.UNHEALTHY
        if _RANK[c.status] > _RANK[worst]:
            worst = c.status
    return worst


def ready(components: Iterable[ComponentHealth], draining: bool) -> bool:
    """Not draining and no critical component unhealthy."""
    if draining:
        return False
    return not any(c.critical and c.status is Status.UNHEALTHY for c in components)


def threshold_status(
    value: float, degraded_above: float | None, unhealthy_above: float | None
) -> Status:
    """Status of a measured value: above ``unhealthy_above`` unhealthy, above ``degraded_above``
    degraded (a limit of None is not checked)."""
    if unhealthy_above is not None and value > unhealthy_above:
        return Status.UNHEALTHY
    if degraded_above is not None and value > degraded_above:
        return Status.DEGRADED
    return Status.HEALTHY


class ThresholdTracker:
    """Consecutive-result hysteresis for an active health check."""

    __slots__ = ("_healthy", "failures", "healthy_threshold", "successes", "unhealthy_threshold")

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be >= 1")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self._healthy: bool | None = None  # None: no result yet
        self.successes = 0  # in a row
        self.failures = 0  # in a row

    def observe(self, success: bool) -> Status:
        """Record one check result; return the status it leaves the component in."""
        if success:
            self.successes += 1
            self.failures = 0
            if self._healthy is None or self.successes >= self.healthy_threshold:
                self._healthy = True
        else:
            self.failures += 1
            self.successes = 0
            if self._healthy is None or self.failures >= self.unhealthy_threshold:
                self._healthy = False
        return self.status

    @property
    def status(self) -> Status:
        if not self._healthy:
            return Status.UNHEALTHY
        return Status.DEGRADED if self.failures else Status.HEALTHY
