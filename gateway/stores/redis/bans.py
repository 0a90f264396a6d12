"""Bans shared by every replica through Redis (``rate_limit.backend: redis``).

What lives in Redis (``P`` = the key prefix, ``gw:`` by default):

- ``P abuse:<ip>``: one hash per scored IP, its score buckets, the end of its ban in
  force and its offence count (with a TTL: ``2 * window_s``, or until its offences are
  forgotten).  ``lua/bans_score.lua`` adds an IP's events and decides its ban atomically
  with Redis TIME, so a scanner spread over the replicas is scored as one, and exactly
  one replica makes the ban.  The hash also keeps the client's last ten scored events
  (``ev``), sent with its points; the ban moves them to ``bev``, its evidence, which
  every replica reads from there (:meth:`RedisBanStore.evidence`): the synced view of
  the bans stays small.
- ``{P bans}`` and its companions: the shared list of bans in force, with a change log
  that lets each replica fetch only what changed (:mod:`gateway.stores.redis.ban_registry`).

Each replica holds a local view of the bans in force, refreshed every
``sync_interval_s`` (0.25 s) with one script call that also removes expired bans, so
:meth:`RedisBanStore.banned` is a dict lookup and a ban made anywhere is in force
everywhere within a second.  :meth:`RedisBanStore.report` only adds the event to a
bounded batch (at most ``max_pending`` IPs; events of further IPs are scored locally)
that a background task sends in pipelines.

Redis trouble never reaches the caller.  On the first error the store logs
``redis_unavailable`` and falls back to a :class:`MemoryBanStore`: events are scored
and IPs banned locally, and the last synced view of the shared bans stays in force
(expired bans dropped).  The sync task keeps trying; once Redis answers again it logs
``redis_recovered``, writes the bans made locally meanwhile to Redis and hands them over
to the shared view, and replays the unbans made meanwhile.  When Redis lost its data (a
restart without persistence), each replica writes back the bans of its view, so a Redis
restart does not lift them (offence counts and scores start again).  Every Redis call
is bounded by ``io_timeout_s``, so a hung server is an outage too.

Modes follow :class:`MemoryBanStore`; the mode of a ban in force is kept with it, so an
IP shadow-banned before a switch to enforce is scored (and banned) again at once.

Works with ``Redis`` and ``RedisCluster`` clients alike: each script call touches keys of
one slot (an IP's hash, or the ``{P bans}`` group).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import RedisError

from gateway.config import Abuse
from gateway.core.abuse import OFFENCE_MEMORY_FACTOR
from gateway.core.evidence import NOTHING_SEEN, Evidence, Seen, decode_many, keep_last
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.stores.bans import Ban, BanStore, by_banned_at, unknown_event
from gateway.stores.memory.bans import MemoryBanStore
from gateway.stores.redis.ban_registry import BanRegistry, merge
from gateway.stores.redis.scripts import Call, Script, reply_text
from gateway.tasks import stop_task

__all__ = ["RedisBanStore"]

_ERRORS = (RedisError, OSError, TimeoutError)
"""What a Redis outage looks like (connection refused or reset, timeouts)."""


class _Pending:
    """One IP's events not yet sent: points by event, and their evidence (bounded)."""

    __slots__ = ("evidence", "points")

    def __init__(self, event: str, points: float, evidence: Evidence) -> None:
        self.points = {event: points}
        self.evidence = keep_last((evidence,))


_Chunk = list[tuple[str, _Pending]]


class RedisBanStore(BanStore):
    """Scores and bans shared by all replicas through Redis, with a local fallback."""

    def __init__(
        self,
        cfg: Abuse,
        *,
        metrics: Metrics,
        redis: Any,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "gw:",
        sync_interval_s: float = 0.25,
        io_timeout_s: float = 1.0,
        max_pending: int = 10_000,
        batch_size: int = 256,
        max_bans: int = 100_000,
        max_log: int = 100_000,
        sync_limit: int = 10_000,
        max_entries: int = 100_000,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._clock = clock
        self._prefix = key_prefix
        self._registry = BanRegistry(
            redis,
            key_prefix=key_prefix,
            max_bans=max_bans,
            max_log=max_log,
            sync_limit=sync_limit,
            batch_size=batch_size,
        )
        self._sync_interval_s = sync_interval_s
        self._io_timeout_s = io_timeout_s
        self._flushing = asyncio.Lock()  # held while the flusher talks to Redis
        self._max_pending = max_pending
        self._batch_size = batch_size
        self._max_entries = max_entries
        self._log = get_logger()
        self._score_script = Script("bans_score.lua")
        self._local = MemoryBanStore(
            cfg,
            metrics=metrics,
            clock=clock,
            max_entries=max_entries,
            max_bans=max_bans,
            publish_gauge=False,
            on_ban=self._unsynced_ban,
        )
        self._view: dict[str, Ban] = {}  # bans in force, as last synced
        self._seq = 0  # change-log position of the view
        self._own: dict[str, tuple[int, Ban | None]] = {}  # our changes not yet synced back
        self._unsynced: deque[Ban] = deque(maxlen=max_pending)  # local bans to write
        self._unbans: dict[str, None] = {}  # unbans to replay once Redis is back
        self._lifted: dict[str, float] = {}  # ip -> when an admin lifted its ban (bounded)
        self._pending: dict[str, _Pending] = {}  # ip -> its events to send
        self._scores: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (score, at)
        self._degraded = False
        self._running = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.reconfigure(cfg)

    # -- configuration ---------------------------------------------------------------

    def reconfigure(self, cfg: Abuse) -> None:
        self._apply_mode(cfg)
        self._score_args = [
            repr(float(cfg.window_s)),
            repr(float(cfg.ban_score)),
            repr(float(cfg.ban_s)),
            repr(float(cfg.ban_multiplier)),
            repr(float(cfg.max_ban_s)),
            repr(OFFENCE_MEMORY_FACTOR),
            cfg.mode,
        ]
        self._local.reconfigure(cfg)

    def add_ban_listener(self, callback: Callable[[str], None]) -> None:
        super().add_ban_listener(callback)
        self._local.add_ban_listener(callback)  # its bans, while Redis is away

    @property
    def degraded(self) -> bool:
        """True while Redis is unreachable and the local fallback is in use."""
        return self._degraded

    # -- hot path --------------------------------------------------------------------

    def banned(self, ip: str) -> Ban | None:
        if not self._blocking:
            return None
        ban = self._view.get(ip)
        if ban is not None and ban.expires_at > self._clock():
            return ban
        if self._local.bans:
            return self._local.banned(ip)
        return None

    def report(self, ip: str, event: str, seen: Seen = NOTHING_SEEN) -> None:
        points = self._points.get(event)
        if points is None:
            raise unknown_event(event)
        if not self._enabled or points <= 0:
            return
        now = self._clock()
        evidence = Evidence.of(now, event, seen)
        if self._degraded or not self._running:
            self._local.add_points(ip, event, points, (evidence,))
            return
        pending = self._pending.get(ip)
        if pending is not None:
            pending.points[event] = pending.points.get(event, 0.0) + points
            pending.evidence.append(evidence)
            return
        ban = self._view.get(ip)
        if ban is not None and ban.expires_at > now:
            return  # already banned everywhere
        if len(self._pending) >= self._max_pending:
            self._local.add_points(ip, event, points, (evidence,))  # Redis is behind
            return
        self._pending[ip] = _Pending(event, points, evidence)
        self._wake.set()

    def score(self, ip: str) -> float:
        now = self._clock()
        seen = self._scores.get(ip)
        shared = seen[0] if seen is not None and now - seen[1] < self._cfg.window_s else 0.0
        waiting = self._pending.get(ip)
        pending = 0.0 if waiting is None else sum(waiting.points.values())
        return shared + pending + self._local.score(ip)

    # -- Redis calls -----------------------------------------------------------------

    def _score_key(self, ip: str) -> str:
        return f"{self._prefix}abuse:{ip}"

    def _set_degraded(self, exc: BaseException) -> None:
        if not self._degraded:
            self._degraded = True
            self._log.warning(
                "redis_unavailable",
                component="bans",
                error=repr(exc),
                fallback="local scores and bans",
            )

    # -- sending events --------------------------------------------------------------

    async def _flusher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._flushing:
                try:
                    await self._flush()
                except Exception as exc:  # a malformed answer must not stop the flusher
                    self._log.error("abuse_flush_failed", error=repr(exc))

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = list(self._pending.items()), {}
            for i in range(0, len(batch), self._batch_size):
                await self._send(batch[i : i + self._batch_size])

    async def _send(self, chunk: _Chunk) -> None:
        if self._degraded:
            self._score_locally(chunk)
            return
        calls: list[Call] = []
        for ip, events in chunk:
            args: list[Any] = list(self._score_args)
            args.append("\n".join(e.encode() for e in events.evidence))
            for event, points in events.points.items():
                args += (event, repr(points))
            calls.append(([self._score_key(ip)], args))
        sent_at = self._clock()
        try:
            async with asyncio.timeout(self._io_timeout_s):
                results = await self._score_script.run_many(self._redis, calls)
        except _ERRORS as exc:
            self._set_degraded(exc)
            self._score_locally(chunk)
            return
        bans: list[Ban] = []
        missed: list[Ban] = []
        now = self._clock()
        for (ip, events), result in zip(chunk, results, strict=True):
            if isinstance(result, BaseException):
                self._log.warning("abuse_score_failed", ip=ip, error=repr(result))
                self._score_locally([(ip, events)])
                continue
            if int(result[0]) == 2:
                ban = self._missed_ban(ip, result, sent_at)
                if ban is not None:
                    missed.append(ban)
                continue
            ban = self._scored(ip, result, now)
            if ban is not None:
                bans.append(ban)
        if bans or missed:
            await self._store_bans(bans + missed)
        for ban in missed:
            if self._own.get(ban.ip, (0, None))[0] > 0:
                # the shared list did not have it: the reply that made it was lost, and
                # its log line and count with it
                self._announce(ban, ban.ban_s)

    def _score_locally(self, chunk: Iterable[tuple[str, _Pending]]) -> None:
        for ip, events in chunk:
            evidence: Sequence[Evidence] = events.evidence
            for event, points in events.points.items():
                self._local.add_points(ip, event, points, evidence)
                evidence = ()  # kept once, with the first

    def _scored(self, ip: str, result: Sequence[Any], now: float) -> Ban | None:
        """Note the score Redis computed; log and count the ban it made, if any."""
        banned = int(result[0]) == 1
        score = float(reply_text(result[2]))
        scores = self._scores
        scores[ip] = (0.0 if banned else score, now)
        scores.move_to_end(ip)
        if len(scores) > self._max_entries:
            scores.popitem(last=False)
        if not banned:
            return None
        reason, ban_s, offences = (
            reply_text(result[1]),
            float(reply_text(result[3])),
            int(reply_text(result[4])),
        )
        at, until = float(reply_text(result[5])), float(reply_text(result[6]))
        ban = Ban(ip, reason, score, until, offences, at)
        self._announce(ban, ban_s)
        if not self._enforce:
            return None
        self._view[ip] = ban
        self._update_gauge()
        self._in_force(ip)
        return ban

    def _missed_ban(self, ip: str, result: Sequence[Any], sent_at: float) -> Ban | None:
        """A ban in force in the client's score that this replica does not know: its
        making's reply was lost (a timeout), so it never reached the shared list either,
        or the view is not synced yet. Installed here and returned, to be added to the
        list (an idempotent add). Not when an unban came after the call was sent: the
        answer may predate it."""
        until = float(reply_text(result[6]))
        known = self._view.get(ip)
        if not self._enforce or (known is not None and known.expires_at >= until - 0.001):
            return None
        lifted = self._lifted.get(ip)
        if lifted is not None and lifted >= sent_at:
            return None
        reason, score = reply_text(result[1]), float(reply_text(result[2]))
        ban = Ban(
            ip, reason, score, until, int(reply_text(result[4])), float(reply_text(result[5]))
        )
        self._view[ip] = ban
        self._update_gauge()
        self._in_force(ip)
        return ban

    async def _store_bans(self, bans: list[Ban]) -> None:
        """Write bans to the shared list; those that could not be written stay local."""
        try:
            async with asyncio.timeout(self._io_timeout_s):
                results = await self._registry.add(bans)
        except _ERRORS as exc:
            self._set_degraded(exc)
            results = [exc] * len(bans)
        for ban, result in zip(bans, results, strict=True):
            if isinstance(result, BaseException):
                self._local.install(ban)
                self._unsynced.append(ban)
            else:
                self._own[ban.ip] = (int(result), ban)

    def _unsynced_ban(self, ban: Ban) -> None:
        self._unsynced.append(ban)
        self._update_gauge()

    # -- syncing the view ------------------------------------------------------------

    async def _syncer(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            await self.sync()

    async def sync(self, *, full: bool = False) -> bool:
        """Bring the local view up to date (the background task does this every
        ``sync_interval_s``); False when Redis could not be reached."""
        try:
            async with asyncio.timeout(self._io_timeout_s * 2):
                if self._unbans:
                    await self._replay_unbans()
                kind, seq, items = await self._registry.fetch(self._seq, full=full)
                if kind == "full" and seq < self._seq and self._view:
                    # Redis lost its data: write back the bans still in force here.
                    await self._registry.write_back(list(self._view.values()), self._clock())
                    kind, seq, items = await self._registry.fetch(self._seq, full=True)
                if self._unsynced:
                    await self._push_unsynced()
        except _ERRORS as exc:
            self._set_degraded(exc)
            self._drop_expired_from_view()
            return False
        except Exception as exc:  # a malformed answer must not stop the sync task
            self._log.error("ban_sync_failed", error=repr(exc))
            return False
        if self._degraded:
            self._degraded = False
            self._log.info("redis_recovered", component="bans")
        self._apply(kind, seq, items)
        return True

    async def _lift(self, ip: str) -> int:
        """Lift the shared ban of ``ip``; the change's sequence number, 0 if none."""
        change = await self._registry.lift(ip)
        await self._redis.hdel(self._score_key(ip), "bu", "bev")
        if change > 0:
            self._own[ip] = (change, None)
        return change

    async def _replay_unbans(self) -> None:
        for ip in list(self._unbans):
            await self._lift(ip)
            del self._unbans[ip]

    def _apply(self, kind: str, seq: int, items: list[Any]) -> None:
        self._view, fresh = merge(self._view, self._own, kind, seq, items)
        self._seq = seq
        self._update_gauge()
        if self._listeners:
            for ip in fresh:
                self._in_force(ip)

    async def _push_unsynced(self) -> None:
        """Write the bans made locally to Redis, then hand them over to the view."""
        now = self._clock()
        bans = list(self._unsynced)
        await self._registry.write_back(bans, self._clock())
        await self._write_evidence(b.ip for b in bans if b.expires_at > now)
        for ban in bans:
            self._unsynced.popleft()
            if ban.expires_at <= now:
                continue
            held = self._local.bans.get(ban.ip)
            if held is ban:
                self._local.discard(ban.ip)
            self._view[ban.ip] = ban

    def _drop_expired_from_view(self) -> None:
        now = self._clock()
        for ip in [ip for ip, b in self._view.items() if b.expires_at <= now]:
            del self._view[ip]
        self._update_gauge()

    def _update_gauge(self) -> None:
        local = sum(1 for ip in self._local.bans if ip not in self._view)
        self._metrics.active_bans.set(len(self._view) + local)

    # -- admin -----------------------------------------------------------------------

    async def list_bans(self) -> list[Ban]:
        now = self._clock()
        bans: dict[str, Ban] = {}
        try:
            async with asyncio.timeout(self._io_timeout_s):
                bans = await self._registry.all()
        except _ERRORS as exc:
            self._set_degraded(exc)
            bans = dict(self._view)
        for ip, ban in self._local.bans.items():
            if ip not in bans or bans[ip].expires_at < ban.expires_at:
                bans[ip] = ban
        return sorted((b for b in bans.values() if b.expires_at > now), key=by_banned_at)

    async def evidence(self, ips: Sequence[str]) -> dict[str, list[Evidence]]:
        found: dict[str, list[Evidence]] = {}
        shared: list[str] = []
        local = self._local
        for ip in ips:
            held = local.evidence_of(ip) if ip in local.bans else None
            if held is not None:
                found[ip] = held
            else:
                shared.append(ip)
        try:
            async with asyncio.timeout(self._io_timeout_s):
                for i in range(0, len(shared), self._batch_size):
                    part = shared[i : i + self._batch_size]
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for ip in part:
                            pipe.hget(self._score_key(ip), "bev")
                        values = await pipe.execute()
                    for ip, value in zip(part, values, strict=True):
                        if value:
                            found[ip] = decode_many(reply_text(value))
        except _ERRORS as exc:
            self._set_degraded(exc)
        return found

    async def _write_evidence(self, ips: Iterable[str]) -> None:
        """Write the evidence of bans made here while Redis was away to their hashes."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for ip in ips:
                held = self._local.evidence_of(ip)
                if held:
                    key = self._score_key(ip)
                    pipe.hset(key, "bev", "\n".join(e.encode() for e in held))
                    # kept (at least) as long as the ban is remembered
                    keep = int(OFFENCE_MEMORY_FACTOR * self._cfg.max_ban_s) + 1
                    pipe.expire(key, keep, nx=True)
                    pipe.expire(key, keep, gt=True)
            await pipe.execute()

    async def unban(self, ip: str) -> bool:
        now = self._clock()
        lifted = self._lifted
        if len(lifted) >= self._max_pending:
            lifted.clear()  # those of long ago: no answer in flight is that old
        lifted[ip] = now
        local = self._local.discard(ip)
        viewed = self._view.pop(ip, None)
        unsynced = [b for b in self._unsynced if b.ip != ip]
        if len(unsynced) != len(self._unsynced):
            self._unsynced.clear()
            self._unsynced.extend(unsynced)
        shared = False
        try:
            async with asyncio.timeout(self._io_timeout_s):
                shared = await self._lift(ip) > 0
        except _ERRORS as exc:
            self._set_degraded(exc)
            if len(self._unbans) < self._max_pending:
                self._unbans[ip] = None  # lifted in Redis too once it is back
        lifted[ip] = self._clock()  # scoring answers sent before this may predate the lift
        self._update_gauge()
        removed = shared or local is not None or (viewed is not None and viewed.expires_at > now)
        if removed:
            self._log.info("unban", ip=ip, by="admin")
        return removed

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        await self.sync(full=True)
        self._tasks = [
            asyncio.create_task(self._syncer(), name="ban-sync"),
            asyncio.create_task(self._flusher(), name="ban-flush"),
        ]
        await self._local.start()

    async def close(self) -> None:
        self._running = False
        # a flush under way finishes first: cancelling it could lose the scores it carries
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._io_timeout_s), self._flushing:
                pass
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await stop_task(task)
        if self._pending and not self._degraded:
            with contextlib.suppress(*_ERRORS):
                async with asyncio.timeout(self._io_timeout_s):
                    await self._flush()
        await self._local.close()
