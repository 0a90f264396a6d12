"""Abuse scores and bans of this process only (``rate_limit.backend: memory``).

:class:`MemoryBanStore` keeps everything in this process.  Its memory is bounded under a
spray of distinct addresses:

- scores: at most ``max_entries`` IPs (default 100,000) in least-recently-scored order.
  Every report drops up to :data:`SWEEP_STEP` entries from the old end whose points have
  all left the window; when the table is still full, a new IP evicts the least recently
  scored one (its points are the most decayed).
- bans (enforced and shadow): at most ``max_bans`` (default 100,000); when full, the ban
  closest to its end makes room.  Expired bans are swept incrementally from a heap
  ordered by expiry (a few per call, plus a background sweep every second once
  :meth:`start` ran); a lookup never returns an expired ban.
- offence counts (for escalation): at most ``max_bans`` IPs, each forgotten
  ``2 * max_ban_s`` after its last ban ends (:func:`gateway.core.abuse.offences_forget_at`).
- evidence (:mod:`gateway.core.evidence`): the last ten scored events of at most
  ``max_evidence`` scored clients (default 10,000) in least-recently-scored order, and
  those of at most ``max_evidence`` bans, the newest.  A record is a few hundred bytes
  (the path is clipped), so these tables, not the score table, would dominate memory
  were they as large: a ban whose evidence made room for newer ones is listed with
  none.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence

from gateway.config import Abuse
from gateway.core.abuse import (
    ScoreState,
    add_event,
    ban_duration,
    is_stale,
    offences_forget_at,
    score_at,
)
from gateway.core.evidence import NOTHING_SEEN, Evidence, Seen, keep_last
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.stores.bans import Ban, BanStore, by_banned_at, unknown_event
from gateway.tasks import stop_task

__all__ = ["SWEEP_STEP", "MemoryBanStore"]

SWEEP_STEP = 8
"""Stale entries (expired bans, decayed scores) dropped per call, at most."""

_BACKGROUND_SWEEP = 10_000
"""Entries the once-a-second background sweep may drop."""


class MemoryBanStore(BanStore):
    """Scores and bans of this process only (``rate_limit.backend: memory``).

    Also the local fallback of the Redis store: ``publish_gauge=False`` leaves the
    ``active_bans`` gauge to the owner, and ``on_ban`` is called with each enforced ban.
    """

    def __init__(
        self,
        cfg: Abuse,
        *,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        max_entries: int = 100_000,
        max_bans: int = 100_000,
        publish_gauge: bool = True,
        on_ban: Callable[[Ban], None] | None = None,
        sweep_interval_s: float = 1.0,
        max_evidence: int = 10_000,
    ) -> None:
        if max_entries < 1 or max_bans < 1 or max_evidence < 1:
            raise ValueError("max_entries, max_bans and max_evidence must be >= 1")
        self._metrics = metrics
        self._clock = clock
        self._max_entries = max_entries
        self._max_bans = max_bans
        self._publish_gauge = publish_gauge
        self._on_ban = on_ban
        self._sweep_interval_s = sweep_interval_s
        self._log = get_logger()
        self._scores: OrderedDict[str, ScoreState] = OrderedDict()
        self._bans: dict[str, Ban] = {}
        self._shadow: dict[str, float] = {}  # ip -> end of a shadow ban
        self._offences: OrderedDict[str, tuple[int, float]] = OrderedDict()  # (n, forget_at)
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, ip), may be stale
        self._max_evidence = max_evidence
        self._evidence: OrderedDict[str, deque[Evidence]] = OrderedDict()  # scored, not banned
        self._ban_evidence: OrderedDict[str, tuple[Evidence, ...]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self.reconfigure(cfg)

    # -- configuration ---------------------------------------------------------------

    def reconfigure(self, cfg: Abuse) -> None:
        self._apply_mode(cfg)
        if self._enforce:
            self._shadow.clear()

    # -- hot path --------------------------------------------------------------------

    def banned(self, ip: str) -> Ban | None:
        if not self._blocking:
            return None
        ban = self._bans.get(ip)
        if ban is None:
            return None
        now = self._clock()
        if ban.expires_at > now:
            return ban
        self._sweep(now)
        self._expire(ip, ban)
        return None

    def report(self, ip: str, event: str, seen: Seen = NOTHING_SEEN) -> None:
        points = self._points.get(event)
        if points is None:
            raise unknown_event(event)
        if self._enabled and points > 0:
            self.add_points(ip, event, points, (Evidence.of(self._clock(), event, seen),))

    def add_points(
        self, ip: str, event: str, points: float, evidence: Sequence[Evidence] = ()
    ) -> Ban | None:
        """Score ``points`` for ``event`` of ``ip`` now, with the ``evidence`` records of
        the events they stand for; returns the ban it caused (enforced or shadow), if
        any."""
        now = self._clock()
        self._sweep(now)
        ban = self._bans.get(ip)
        if ban is not None:
            if ban.expires_at > now:
                return None  # already banned: nothing more to score
            self._expire(ip, ban)
        until = self._shadow.get(ip)
        if until is not None:
            if until > now:
                return None
            del self._shadow[ip]
        scores = self._scores
        state = scores.get(ip)
        if state is None:
            if len(scores) >= self._max_entries:
                scores.popitem(last=False)
            state = scores[ip] = ScoreState()
        else:
            scores.move_to_end(ip)
        if evidence:
            self._note(ip, evidence)
        cfg = self._cfg
        score = add_event(state, points, now, cfg.window_s)
        if score < cfg.ban_score:
            return None
        del scores[ip]  # a ban resets the score
        return self._ban(ip, event, score, now)

    def _note(self, ip: str, evidence: Sequence[Evidence]) -> None:
        """Keep ``evidence`` as the newest scored events of ``ip``."""
        table = self._evidence
        held = table.get(ip)
        if held is None:
            if len(table) >= self._max_evidence:
                table.popitem(last=False)
            table[ip] = keep_last(evidence)
        else:
            table.move_to_end(ip)
            held.extend(evidence)

    def _keep_ban_evidence(self, ip: str, since: float) -> None:
        """Move the scored events of ``ip`` (those of its score's window) to its ban."""
        held = self._evidence.pop(ip, None)
        table = self._ban_evidence
        table.pop(ip, None)
        if held is None:
            return
        if len(table) >= self._max_evidence:
            table.popitem(last=False)
        table[ip] = tuple(e for e in held if e.at >= since)

    def score(self, ip: str) -> float:
        state = self._scores.get(ip)
        return 0.0 if state is None else score_at(state, self._clock(), self._cfg.window_s)

    # -- bans ------------------------------------------------------------------------

    def _ban(self, ip: str, reason: str, score: float, now: float) -> Ban:
        cfg = self._cfg
        known = self._offences.pop(ip, None)
        offences = known[0] + 1 if known is not None and known[1] > now else 1
        duration = ban_duration(offences, cfg.ban_s, cfg.ban_multiplier, cfg.max_ban_s)
        ban = Ban(ip, reason, score, now + duration, offences, now)
        self._offences[ip] = (offences, offences_forget_at(ban.expires_at, cfg.max_ban_s))
        if len(self._offences) > self._max_bans:
            self._offences.popitem(last=False)
        self._announce(ban, duration)
        self._keep_ban_evidence(ip, now - 2 * cfg.window_s)
        if self._enforce:
            self.install(ban)
            if self._on_ban is not None:
                self._on_ban(ban)
        else:
            self._make_room()
            self._shadow[ip] = ban.expires_at
            self._push_expiry(ban.expires_at, ip)
        return ban

    def install(self, ban: Ban) -> None:
        """Put ``ban`` in force here (no log, no count: the caller did that)."""
        if ban.ip not in self._bans:
            self._make_room()
        self._bans[ban.ip] = ban
        self._push_expiry(ban.expires_at, ban.ip)
        self._update_gauge()
        self._in_force(ban.ip)

    def discard(self, ip: str) -> Ban | None:
        """Drop the enforced ban of ``ip`` here without logging; returns it if it was in
        force.  Shadow bans are left alone (they are not listed, nor lifted)."""
        ban = self._bans.pop(ip, None)
        if ban is None:
            return None
        self._update_gauge()
        return ban if ban.expires_at > self._clock() else None

    @property
    def bans(self) -> Mapping[str, Ban]:
        """The enforced bans held (some may have just expired)."""
        return self._bans

    @property
    def entry_count(self) -> int:
        """IPs in the score table."""
        return len(self._scores)

    def sizes(self) -> dict[str, int]:
        """How many entries each table holds (for tests and debugging)."""
        return {
            "scores": len(self._scores),
            "bans": len(self._bans),
            "shadow_bans": len(self._shadow),
            "offences": len(self._offences),
            "expiry_heap": len(self._expiry),
            "evidence": len(self._evidence),
            "ban_evidence": len(self._ban_evidence),
        }

    def _push_expiry(self, expires_at: float, ip: str) -> None:
        heap = self._expiry
        heapq.heappush(heap, (expires_at, ip))
        if len(heap) > 2 * (len(self._bans) + len(self._shadow)) + 1024:
            # Entries of lifted or replaced bans: rebuild from what is held.
            heap[:] = [(b.expires_at, i) for i, b in self._bans.items()]
            heap.extend((until, i) for i, until in self._shadow.items())
            heapq.heapify(heap)

    def _make_room(self) -> None:
        """Drop the ban closest to its end while the ban tables are full."""
        heap = self._expiry
        while len(self._bans) + len(self._shadow) >= self._max_bans and heap:
            expires_at, ip = heapq.heappop(heap)
            ban = self._bans.get(ip)
            if ban is not None and ban.expires_at == expires_at:
                del self._bans[ip]
                self._log.warning("ban_evicted", ip=ip, expires_at=expires_at)
            elif self._shadow.get(ip) == expires_at:
                del self._shadow[ip]

    def _expire(self, ip: str, ban: Ban) -> None:
        if self._bans.get(ip) is ban:
            del self._bans[ip]
            self._log.info("unban", ip=ip, by="expiry")
            self._update_gauge()

    def _sweep(self, now: float, limit: int = SWEEP_STEP) -> None:
        heap = self._expiry
        n = limit
        while n and heap and heap[0][0] <= now:
            expires_at, ip = heapq.heappop(heap)
            n -= 1
            ban = self._bans.get(ip)
            if ban is not None and ban.expires_at == expires_at:
                self._expire(ip, ban)
            elif self._shadow.get(ip) == expires_at:
                del self._shadow[ip]
        scores, window_s = self._scores, self._cfg.window_s
        n = limit
        while n and scores:
            ip, state = next(iter(scores.items()))
            if not is_stale(state, now, window_s):
                break
            del scores[ip]
            n -= 1
        offences = self._offences
        n = limit
        while n and offences:
            ip, (_, forget_at) = next(iter(offences.items()))
            if forget_at > now:
                break
            del offences[ip]
            n -= 1

    def _update_gauge(self) -> None:
        if self._publish_gauge:
            self._metrics.active_bans.set(len(self._bans))

    # -- admin -----------------------------------------------------------------------

    async def list_bans(self) -> list[Ban]:
        now = self._clock()
        self._sweep(now, limit=len(self._expiry) + 1)
        return sorted((b for b in self._bans.values() if b.expires_at > now), key=by_banned_at)

    def evidence_of(self, ip: str) -> list[Evidence] | None:
        """The evidence of the ban of ``ip`` held here, if any."""
        found = self._ban_evidence.get(ip)
        return None if found is None else list(found)

    async def evidence(self, ips: Sequence[str]) -> dict[str, list[Evidence]]:
        found: dict[str, list[Evidence]] = {}
        for ip in ips:
            records = self.evidence_of(ip)
            if records is not None and ip in self._bans:
                found[ip] = records
        return found

    async def unban(self, ip: str) -> bool:
        ban = self.discard(ip)
        if ban is None:
            return False
        self._log.info("unban", ip=ip, by="admin")
        return True

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sweeper(), name="ban-sweeper")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                self._sweep(self._clock(), limit=_BACKGROUND_SWEEP)
            except Exception as exc:  # keep sweeping whatever happens
                self._log.error("ban_sweep_failed", error=repr(exc))
