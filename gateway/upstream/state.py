"""Per-upstream runtime state: pool, circuit breaker, bulkhead, retry budget, metrics.

Kept across config reloads while the upstream's settings are unchanged, so a reload
neither drops keep-alive connections nor resets a breaker.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.core.breaker import Breaker
from gateway.core.concurrency import GradientLimit, Priority, admits, critical_reserve
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
        "critical_inflight",
        "duration",
        "errors",
        "gradient",
        "inflight",
        "inflight_gauge",
        "limit_gauge",
        "max_inflight",
        "name",
        "pool",
        "websockets",
    )

    def __init__(self, name: str, cfg: Upstream, metrics: Metrics, log: Any) -> None:
        self.name = name
        self.config = cfg
        self.client = UpstreamClient(UpstreamSettings.of(cfg))
        # the HTTP leg's pool, called without the (interpreted) client's frame in between
        self.pool = self.client.pool
        self.breaker = Breaker(
            cfg.circuit_breaker, on_transition=breaker_observer(name, metrics, log)
        )
        metrics.set_circuit_state(name, "closed")
        self.budget = RetryBudget(cfg.retries.budget_ratio)
        self.inflight = 0
        self.critical_inflight = 0
        self.max_inflight = cfg.max_inflight
        self.gradient: GradientLimit | None = None
        self.limit_gauge = metrics.concurrency_limit.labels(name)
        self._set_mode(cfg)
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
        if cfg.concurrency != self.config.concurrency or cfg.max_inflight != (
            self.config.max_inflight
        ):
            self._set_mode(cfg)
        self.config = cfg
        return True

    def _set_mode(self, cfg: Upstream) -> None:
        if cfg.concurrency.mode == "adaptive":
            # the event loop's clock is the monotonic one the exchanges are timed with
            self.gradient = GradientLimit(
                minimum=min(cfg.concurrency.min, cfg.max_inflight),
                maximum=cfg.max_inflight,
                now=time.monotonic(),
            )
        else:
            self.gradient = None
        self.limit_gauge.set(self.limit)

    def keep_learned(self, old: UpstreamState) -> None:
        """Take over the adaptive limit learned by the state this one replaces (a reload
        that rebuilt the pool): same URL, same mode, ``min`` and ``max_inflight``."""
        if (
            old.gradient is not None
            and self.gradient is not None
            and old.config.url == self.config.url
            and old.config.concurrency == self.config.concurrency
            and old.config.max_inflight == self.config.max_inflight
        ):
            self.gradient = old.gradient
            self.limit_gauge.set(self.limit)

    @property
    def limit(self) -> int:
        """The concurrency limit in force: ``max_inflight`` (fixed) or the learned one."""
        return self.gradient.limit if self.gradient is not None else self.max_inflight

    @property
    def refusal_wait_s(self) -> float:
        """How long a request over the limit waits before it is refused (adaptive only)."""
        return self.gradient.refusal_wait_s if self.gradient is not None else 0.0

    def admits(self, priority: Priority, *, reserved: bool) -> bool:
        """Whether a request of ``priority`` may start now (SPEC section 10); ``reserved``:
        a critical route uses this upstream, so normal leaves it a reserve."""
        if self.gradient is None:
            if priority is Priority.NORMAL and not reserved:
                return self.inflight < self.max_inflight  # version 1: the bulkhead alone
            limit = self.max_inflight
        else:
            if not self.inflight:
                return True  # admits' first rule, without its call: the idle upstream's case
            limit = self.gradient.limit
        return admits(
            priority,
            inflight=self.inflight,
            critical_inflight=self.critical_inflight,
            limit=limit,
            cap=self.max_inflight,
            reserve=critical_reserve(limit) if reserved else 0,
        )

    def on_sample(self, latency_s: float, now: float, inflight: int, delay_s: float) -> None:
        """A completed exchange (adaptive mode learns from it); ``delay_s`` is the
        gateway's own delay (its event loop's lag), a part of ``latency_s``."""
        g = self.gradient
        if g is not None:
            before = g.limit
            g.on_sample(latency_s, now, inflight, delay_s)
            if g.limit != before:
                self.limit_gauge.set(g.limit)

    async def close(self) -> None:
        await self.client.close()
