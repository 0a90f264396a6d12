"""Break-glass allow list: client addresses exempt from bans and rate limits for a while
(SPEC section 12, ``/admin/allow``).

:class:`AllowList` keeps the entries of this process (``rate_limit.backend: memory``);
:class:`gateway.stores.redis.allow.RedisAllowList` shares them through Redis, so an entry
made on one replica applies on every replica within a second.  The request pipeline
asks :meth:`AllowList.exempts` (a dict lookup per prefix length in use; nothing at all
while the list is empty); ``deny_cidrs`` is checked before it and still refuses.

Every change is logged (``allow_added``, ``allow_removed``: who, what, how long, why)
and counted (``gateway_allow_changes_total{action}``); requests let through are counted
in ``gateway_allowed_requests_total``.  No metric carries an address.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.core.allowlist import AllowEntry, AllowTable, IPNetwork, entry_name
from gateway.core.client_ip import IPAddress
from gateway.logs import get_logger
from gateway.metrics import Metrics

__all__ = ["AllowList", "AllowListFullError", "AllowUnavailableError"]

MAX_ENTRIES = 1000
"""Entries held at most (a break-glass list is short; a long one is a config change)."""


class AllowListFullError(Exception):
    """No room for another entry."""


class AllowUnavailableError(Exception):
    """The shared store could not be reached: the change was not made."""


class AllowList:
    """The allow entries of this process."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._max_entries = max_entries
        self._log = get_logger()
        self._table = AllowTable()
        self._soonest = math.inf  # when the first entry ends
        self.active = False  # entries are held (read on every request: a plain attribute)

    # -- hot path --------------------------------------------------------------------

    def exempts(self, ip: IPAddress) -> bool:
        """True when an entry in force covers ``ip`` (counted)."""
        if not self.active:
            return False
        now = self._clock()
        if now >= self._soonest:
            self._prune(now)
        if self._table.match(ip, now) is None:
            return False
        self._metrics.allowed_requests.inc()
        return True

    def covers(self, ip: IPAddress) -> AllowEntry | None:
        """The entry that covers ``ip``, if any (not counted: ``/admin/explain``)."""
        return self._table.match(ip, self._clock()) if self.active else None

    # -- admin -----------------------------------------------------------------------

    async def add(self, net: IPNetwork, ttl_s: float, reason: str, by: str) -> AllowEntry:
        """Make (or renew) the entry of ``net``; :class:`AllowListFullError` when there is no
        room."""
        now = self._clock()
        self._prune(now)
        entry = AllowEntry(entry_name(net), now + ttl_s, reason, now, by)
        if self._table.get(net) is None and len(self._table) >= self._max_entries:
            raise AllowListFullError
        self._install(entry)
        self._changed("added", entry, by)
        return entry

    async def remove(self, net: IPNetwork, by: str) -> AllowEntry | None:
        """Remove the entry of ``net``; the entry, or None when there was none in force."""
        entry = self._table.remove(net)
        self._update()
        if entry is None or entry.expires_at <= self._clock():
            return None
        self._changed("removed", entry, by)
        return entry

    async def entries(self) -> list[AllowEntry]:
        """The entries in force, the soonest to end first."""
        return self._table.live(self._clock())

    # -- the table -------------------------------------------------------------------

    def _install(self, entry: AllowEntry) -> None:
        self._table.put(entry)
        self._update()

    def _replace(self, table: AllowTable) -> None:
        self._table = table
        self._update()

    def _update(self) -> None:
        live = self._table.live(self._clock())
        self._soonest = live[0].expires_at if live else math.inf
        self.active = bool(self._table)
        self._metrics.allow_entries.set(len(live))

    def _prune(self, now: float) -> None:
        for entry in self._table.prune(now):
            self._log.info("allow_expired", ip=entry.ip, reason=entry.reason)
        self._update()

    def _changed(self, action: str, entry: AllowEntry, by: str) -> None:
        self._metrics.allow_changes.labels(action).inc()
        self._log.warning(
            f"allow_{action}",
            ip=entry.ip,
            by=by,
            reason=entry.reason,
            ttl_s=round(entry.expires_at - entry.created_at, 3),
            expires_at=round(entry.expires_at, 3),
        )

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start background work (the shared store's sync)."""

    async def close(self) -> None:
        """Stop background work."""
