"""When a WebSocket may open and when an open one must end (SPEC section 9), as pure
decisions; :mod:`gateway.pipeline.wsregistry` applies them.

- A client that is denied (``deny_cidrs``, also after a reload) or banned loses its open
  WebSockets with 1008 (policy violation, RFC 6455 7.4.1): a ban must not leave it a
  channel to the upstream.
- A WebSocket with no frame either way for ``websocket.idle_timeout_s`` is closed with
  1001 (going away). Any frame counts, pings included, as NGINX's
  ``proxy_read_timeout`` and Envoy's stream idle timeout count any bytes: an
  application's keep-alive pings keep its socket, and one client's sockets are capped
  by ``max_per_client`` whatever they do.
- An upgrade is refused (503) when the client holds ``max_per_client`` open WebSockets,
  or the upstream ``max_connections`` (each open WebSocket holds one connection to it).
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "BANNED",
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "DENIED",
    "IDLE",
    "admission",
    "sweep_interval_s",
    "verdict",
]

CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001

BANNED = (CLOSE_POLICY, "banned")
DENIED = (CLOSE_POLICY, "denied")
IDLE = (CLOSE_GOING_AWAY, "idle timeout")

Refusal = Literal["client", "upstream"]


def verdict(
    *, denied: bool, banned: bool, idle_s: float, idle_timeout_s: float
) -> tuple[int, str] | None:
    """The close code and reason an open WebSocket gets now, or None to keep it."""
    if denied:
        return DENIED
    if banned:
        return BANNED
    if idle_s >= idle_timeout_s:
        return IDLE
    return None


def admission(
    client_open: int, max_per_client: int, upstream_open: int, max_connections: int
) -> Refusal | None:
    """Why a new WebSocket is refused (its client's cap first), or None to open it."""
    if client_open >= max_per_client:
        return "client"
    if upstream_open >= max_connections:
        return "upstream"
    return None


def sweep_interval_s(idle_timeout_s: float) -> float:
    """How often open WebSockets are checked: twice a second (a ban made anywhere, a
    mode switch, is caught within that even without its event), more often for an idle
    timeout under two seconds, so a socket ends within a quarter of it past its time."""
    return max(0.02, min(0.5, idle_timeout_s / 4))
