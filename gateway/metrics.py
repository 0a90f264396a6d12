"""Prometheus metrics of SPEC section 6, on one registry owned by the gateway.

Labels are bounded: route and upstream names come from the config, never a client
address or a raw path.  Children for the label sets known at config time are made
once (``bind``) so that recording a request is a few attribute look-ups.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gateway import __version__
from gateway.core.breaker import State
from gateway.loopmetrics import LoopCounter, LoopGauge, LoopHistogram

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

CIRCUIT_STATES = ("closed", "open", "half_open")
HEALTH_STATUSES = ("healthy", "degraded", "unhealthy")

__all__ = [
    "CIRCUIT_STATES",
    "CONTENT_TYPE_LATEST",
    "HEALTH_STATUSES",
    "Metrics",
    "breaker_observer",
]


class Metrics:
    """Every metric the gateway exports, registered on its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "gateway_"
        # updated on every request, from the event loop only: lock-free (loopmetrics)
        self.requests_total = LoopCounter(
            p + "requests_total", "Requests answered.", ["route", "method", "code"], r
        )
        self.request_duration = LoopHistogram(
            p + "request_duration_seconds",
            "Time from request to the end of the response.",
            ["route"],
            r,
            LATENCY_BUCKETS,
        )
        self.upstream_duration = LoopHistogram(
            p + "upstream_request_duration_seconds",
            "Time of the exchange with the upstream, to the response headers.",
            ["upstream"],
            r,
            LATENCY_BUCKETS,
        )
        self.upstream_errors = LoopCounter(
            p + "upstream_errors_total",
            "Upstream exchanges that failed, by kind.",
            ["upstream", "kind"],
            r,
        )
        self.inflight = LoopGauge(
            p + "inflight_requests", "Requests in flight to the upstream.", ["upstream"], r
        )
        self.concurrency_limit = LoopGauge(
            p + "upstream_concurrency_limit",
            "The upstream's concurrency limit in force (fixed mode: max_inflight).",
            ["upstream"],
            r,
        )
        self.shed_total = LoopCounter(
            p + "shed_total",
            "Requests refused with 503 at the upstream's concurrency limit.",
            ["route", "priority"],
            r,
        )
        self.ratelimit_decisions = LoopCounter(
            p + "ratelimit_decisions_total",
            "Rate-limit decisions by policy.",
            ["policy", "decision"],
            r,
        )
        self.identity_verifications = LoopCounter(
            p + "identity_verifications_total",
            "Credentials presented on routes that read identity, by kind and outcome.",
            ["kind", "result"],
            r,
        )
        self.ratelimit_backend_errors = Counter(
            p + "ratelimit_backend_errors_total",
            "Rate-limit decisions the shared backend could not make.",
            registry=r,
        )
        self.bans_total = Counter(p + "bans_total", "Bans made, by reason.", ["reason"], registry=r)
        self.active_bans = Gauge(p + "active_bans", "Bans in force.", registry=r)
        self.allow_changes = Counter(
            p + "allow_changes_total",
            "Break-glass allow entries made (added) or lifted (removed) through the admin API.",
            ["action"],
            registry=r,
        )
        self.allow_entries = Gauge(
            p + "allow_entries", "Break-glass allow entries in force.", registry=r
        )
        self.allowed_requests = Counter(
            p + "allowed_requests_total",
            "Requests exempt from bans and rate limits by a break-glass allow entry.",
            registry=r,
        )
        self.admin_auth_failures = Counter(
            p + "admin_auth_failures_total",
            "Admin calls refused for their token: a wrong or missing one (unauthorized), or"
            " any once the client's budget of failures is spent (throttled).",
            ["result"],
            registry=r,
        )
        self.circuit_state = Gauge(
            p + "circuit_state",
            "Circuit breaker state (1 for the current state).",
            ["upstream", "state"],
            registry=r,
        )
        self.circuit_transitions = Counter(
            p + "circuit_transitions_total",
            "Circuit breaker transitions.",
            ["upstream", "from_state", "to_state"],
            registry=r,
        )
        self.health_status = Gauge(
            p + "health_status",
            "Component health (1 for the current status).",
            ["component", "status"],
            registry=r,
        )
        self.health_check_duration = Histogram(
            p + "health_check_duration_seconds",
            "Duration of background health checks.",
            ["component"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            p + "config_reloads_total", "Config reloads by result.", ["result"], registry=r
        )
        self.config_last_reload_success = Gauge(
            p + "config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully.",
            registry=r,
        )
        self.config_last_reload_successful = Gauge(
            p + "config_last_reload_successful",
            "1 when the last config load or reload succeeded, 0 while the file is refused.",
            registry=r,
        )
        self.build_info = Gauge(
            p + "build_info", "Build information.", ["version", "python"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        for action in ("added", "removed"):
            self.allow_changes.labels(action)
        for result in ("unauthorized", "throttled"):
            self.admin_auth_failures.labels(result)

    def set_circuit_state(self, upstream: str, state: str) -> None:
        for s in CIRCUIT_STATES:
            self.circuit_state.labels(upstream, s).set(1 if s == state else 0)

    def set_health_status(self, component: str, status: str) -> None:
        for s in HEALTH_STATUSES:
            self.health_status.labels(component, s).set(1 if s == status else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def breaker_observer(upstream: str, metrics: Metrics, log: Any) -> Callable[[State, State], None]:
    """An ``on_transition`` callback for :class:`~gateway.core.breaker.Breaker`.

    Logs ``circuit_transition`` (warning when opening) and updates
    ``circuit_transitions_total`` and ``circuit_state``.  The initial ``closed`` state
    is not reported: call ``metrics.set_circuit_state(upstream, "closed")`` when the
    breaker is made.
    """
    transitions = metrics.circuit_transitions

    def on_transition(frm: State, to: State) -> None:
        transitions.labels(upstream, frm.value, to.value).inc()
        metrics.set_circuit_state(upstream, to.value)
        emit = log.warning if to is State.OPEN else log.info
        emit("circuit_transition", upstream=upstream, from_state=frm.value, to_state=to.value)

    return on_transition
