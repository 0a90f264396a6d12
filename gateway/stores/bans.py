"""Ban stores: where abuse scores and bans live (SPEC sections 3, 5 and 6).

The request pipeline calls :meth:`BanStore.banned` first thing on every request and
:meth:`BanStore.report` for every abuse event; both are synchronous and O(1).  The
scoring rules are :mod:`gateway.core.abuse`; a store only keeps the state.  The
backends are :mod:`gateway.stores.memory.bans` (this process) and
:mod:`gateway.stores.redis.bans` (every replica); :func:`gateway.stores.make_ban_store`
picks one.

Modes: ``enabled: false`` makes :meth:`~BanStore.report` a no-op and
:meth:`~BanStore.banned` always ``None``.  ``mode: shadow`` runs the same scoring; a ban
is logged as ``ban_shadow`` and counted in ``bans_total`` but blocks nothing and is not
listed.  While such a shadow ban would be in force, the IP's events are not scored (as
an enforced ban would have refused its requests), so shadow counts match what enforce
mode would do.  Switching to enforce drops the shadow bans; switching to shadow keeps
the enforced ones, unenforced, until they expire.

An admin unban lifts the ban but keeps the offence count: the next ban of that IP
still escalates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import Abuse
from gateway.core.abuse import EVENTS
from gateway.core.evidence import NOTHING_SEEN, Evidence, Seen
from gateway.metrics import Metrics

__all__ = ["Ban", "BanStore", "by_banned_at", "event_points", "unknown_event"]


@dataclass(frozen=True, slots=True)
class Ban:
    ip: str
    reason: str
    score: float
    expires_at: float  # unix time (time.time())
    offences: int
    banned_at: float

    @property
    def ban_s(self) -> float:
        return self.expires_at - self.banned_at

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``GET /admin/bans``)."""
        return {
            "ip": self.ip,
            "reason": self.reason,
            "score": self.score,
            "expires_at": self.expires_at,
            "offences": self.offences,
            "banned_at": self.banned_at,
            "ban_s": self.ban_s,
        }


def event_points(cfg: Abuse) -> dict[str, float]:
    """Points of each event of :data:`gateway.core.abuse.EVENTS` under ``cfg``."""
    return {event: float(getattr(cfg.scores, event)) for event in EVENTS}


def unknown_event(event: str) -> ValueError:
    return ValueError(f"unknown abuse event {event!r} (expected one of {', '.join(EVENTS)})")


class BanStore(ABC):
    """Abuse scores and bans, as the request pipeline and the admin endpoints see them."""

    _metrics: Metrics
    _log: Any
    _enforce: bool

    @abstractmethod
    def banned(self, ip: str) -> Ban | None:
        """The ban in force for ``ip``; ``None`` when there is none, when it expired,
        in shadow mode and when abuse detection is disabled.  O(1), no I/O."""

    @abstractmethod
    def report(self, ip: str, event: str, seen: Seen = NOTHING_SEEN) -> None:
        """Score one abuse ``event`` (one of ``EVENTS``) of ``ip``; may ban it.
        ``seen`` is the request's facts, kept as evidence (the last
        :data:`~gateway.core.evidence.MAX_EVIDENCE` scored events of a client go with
        its ban).  Never blocks and never raises for backend trouble; an unknown event
        is a ``ValueError``."""

    @abstractmethod
    def score(self, ip: str) -> float:
        """The score of ``ip`` as this process sees it now (for ``/admin/explain``)."""

    @abstractmethod
    async def list_bans(self) -> list[Ban]:
        """The bans in force, oldest first."""

    @abstractmethod
    async def evidence(self, ips: Sequence[str]) -> dict[str, list[Evidence]]:
        """The evidence of the bans of ``ips`` (oldest event first); an IP without a ban
        or whose evidence is no longer held is left out."""

    @abstractmethod
    async def unban(self, ip: str) -> bool:
        """Lift the ban of ``ip``; ``True`` if there was one (logged as ``unban``)."""

    @abstractmethod
    def reconfigure(self, cfg: Abuse) -> None:
        """Apply a reloaded ``abuse`` section; scores and bans are kept."""

    _listeners: tuple[Callable[[str], None], ...] = ()

    def add_ban_listener(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(ip)`` whenever a ban of ``ip`` comes into force in this
        process: made here, or (Redis) made by another replica and synced. It may be
        called again for a ban already known; it must be quick and not block."""
        self._listeners = (*self._listeners, callback)

    def _in_force(self, ip: str) -> None:
        for callback in self._listeners:
            try:
                callback(ip)
            except Exception:  # a listener's bug must not undo or stop a ban
                self._log.exception("ban_listener_failed")

    def _announce(self, ban: Ban, ban_s: float) -> None:
        """Count and log a new ban (``ban_shadow`` in shadow mode)."""
        self._metrics.bans_total.labels(ban.reason).inc()
        self._log.info(
            "ban" if self._enforce else "ban_shadow",
            ip=ban.ip,
            reason=ban.reason,
            score=round(ban.score, 3),
            ban_s=ban_s,
            offences=ban.offences,
            expires_at=ban.expires_at,
        )

    def _apply_mode(self, cfg: Abuse) -> None:
        """The settings every store reads on the hot path, derived once per config."""
        self._cfg = cfg
        self._points = event_points(cfg)
        self._enabled = cfg.enabled
        self._enforce = cfg.mode == "enforce"
        self._blocking = cfg.enabled and self._enforce

    @abstractmethod
    async def start(self) -> None:
        """Start background work (sweeps, sync); never raises for backend trouble."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work."""


def by_banned_at(ban: Ban) -> float:
    """The sort key of ban listings: oldest first."""
    return ban.banned_at
