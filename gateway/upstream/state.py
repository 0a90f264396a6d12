"""Per-upstream runtime state: pool, circuit breaker, bulkhead, retry budget, metrics.

Kept across config reloads while the upstream's settings are unchanged, so a reload
neither drops keep-alive connections nor resets a breaker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.core.breaker import Breaker
from gateway.core.retry import RetryBudget
from gateway.metrics import breaker_observer
from gateway.upstream.client import UpstreamClient, UpstreamSettings

if TYPE_CHECKING:
    from gateway.config import Upstream
    from gateway.metrics import Metrics

_ERROR_KINDS = (
    "connect",
    "timeout",
    "protocol",
    "response_head_too_large",
    "circuit_open",
    "bulkhead_full",
)


class UpstreamState:
    """Everything the proxy keeps for one upstream."""

    __slots__ = (
        "breaker",
        "budget",
        "client",
        "config",
        "duration",
        "errors",
        "inflight",
        "inflight_gauge",
        "max_inflight",
        "name",
        "websockets",
    )

    def __init__(self, name: str, cfg: Upstream, metrics: Metrics, log: Any) -> None:
        self.name = name
        self.config = cfg
        self.client = UpstreamClient(UpstreamSettings.of(cfg))
        self.breaker = Breaker(
            cfg.circuit_breaker, on_transition=breaker_observer(name, metrics, log)
        )
        metrics.set_circuit_state(name, "closed")
        self.budget = RetryBudget(cfg.retries.budget_ratio)
        self.inflight = 0
        self.max_inflight = cfg.max_inflight
        # open WebSockets through this pool (kept open while it is retired); the cap of
        # max_connections counts by name (Runtime.websockets), so a rebuilt pool keeps it
        self.websockets = 0
        self.inflight_gauge = metrics.inflight.labels(name)
        self.duration = metrics.upstream_duration.labels(name)
        self.errors = {k: metrics.upstream_errors.labels(name, k) for k in _ERROR_KINDS}

    def reconfigure(self, cfg: Upstream) -> bool:
        """Apply a new config; False when the pool must be rebuilt (URL or pool settings)."""
        if UpstreamSettings.of(cfg) != self.client.settings:
            return False
        if cfg.circuit_breaker != self.config.circuit_breaker:
            self.breaker.reconfigure(cfg.circuit_breaker)
        if cfg.retries.budget_ratio != self.config.retries.budget_ratio:
            self.budget = RetryBudget(cfg.retries.budget_ratio)
        self.max_inflight = cfg.max_inflight
        self.config = cfg
        return True

    async def close(self) -> None:
        await self.client.close()
