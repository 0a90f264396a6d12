"""The break-glass allow list shared by every replica through Redis.

What lives in Redis (``P`` = the key prefix): ``{P allow}``, a hash of the entries
(name -> JSON record), ``{P allow}:exp``, their ends, and ``{P allow}:v``, a version
(a random token) set anew on every change (``lua/allow.lua`` makes changes atomically
and drops expired entries).  Each replica reads the version every ``sync_interval_s``
(0.25 s) and the hash only when the version moved, so an entry made or removed on one
replica applies on every replica within a second, for one ``GET`` per replica and
interval.

Redis trouble: the entries last synced stay in force until they end (a replica keeps
letting the allowed client through), and changes are refused
(:class:`~gateway.stores.allow.AllowUnavailableError`: the admin API answers 503), so no
replica holds an entry the others do not know of.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from gateway.core.allowlist import AllowEntry, AllowTable, IPNetwork, entry_name
from gateway.metrics import Metrics
from gateway.stores.allow import MAX_ENTRIES, AllowList, AllowListFullError, AllowUnavailableError
from gateway.stores.redis.scripts import Script, reply_text
from gateway.tasks import stop_task

__all__ = ["RedisAllowList"]

_ERRORS = (RedisError, OSError, TimeoutError)


class RedisAllowList(AllowList):
    """Allow entries shared through Redis; a local table answers requests."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        redis: Any,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "gw:",
        max_entries: int = MAX_ENTRIES,
        sync_interval_s: float = 0.25,
        io_timeout_s: float = 1.0,
    ) -> None:
        super().__init__(metrics=metrics, clock=clock, max_entries=max_entries)
        self._redis = redis
        tag = "{" + key_prefix + "allow}"
        self._keys = [tag, tag + ":exp", tag + ":v"]
        self._script = Script("allow.lua")
        self._sync_interval_s = sync_interval_s
        self._io_timeout_s = io_timeout_s
        self._version: str | None = None  # of the table held; None: never read
        self._degraded = False
        self._task: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        return self._degraded

    # -- admin -----------------------------------------------------------------------

    async def add(self, net: IPNetwork, ttl_s: float, reason: str, by: str) -> AllowEntry:
        now = self._clock()
        entry = AllowEntry(entry_name(net), now + ttl_s, reason, now, by)
        record = orjson.dumps(entry.record()).decode()
        args = ["set", entry.ip, "", record, repr(entry.expires_at), self._max_entries]
        if await self._call(args) != 1:
            raise AllowListFullError
        self._install(entry)  # here at once; the others at their next sync
        self._changed("added", entry, by)
        return entry

    async def remove(self, net: IPNetwork, by: str) -> AllowEntry | None:
        held = self._table.get(net)
        code = await self._call(["del", entry_name(net), ""])
        self._table.remove(net)
        self._update()
        if code != 1:
            return None
        entry = held or AllowEntry(entry_name(net), self._clock(), "", self._clock(), "")
        self._changed("removed", entry, by)
        return entry

    async def entries(self) -> list[AllowEntry]:
        await self.sync()
        return await super().entries()

    async def _call(self, args: list[Any]) -> int:
        args[2] = secrets.token_hex(8)
        try:
            async with asyncio.timeout(self._io_timeout_s):
                reply = await self._script.run(self._redis, self._keys, args)
        except _ERRORS as exc:
            self._set_degraded(exc)
            raise AllowUnavailableError from exc
        self._version = None  # changed: read the whole list again at the next sync
        return int(reply)

    # -- sync ------------------------------------------------------------------------

    async def sync(self) -> bool:
        """Re-read the shared entries when they changed; False when Redis could not be
        reached (the entries held stay until they end)."""
        try:
            async with asyncio.timeout(self._io_timeout_s):
                raw = await self._redis.get(self._keys[2])
                version = "" if raw is None else reply_text(raw)
                if version == self._version:
                    self._recovered()
                    return True
                records = await self._redis.hgetall(self._keys[0])
        except _ERRORS as exc:
            self._set_degraded(exc)
            return False
        self._recovered()
        table = AllowTable()
        for key, value in records.items():
            try:
                entry = AllowEntry.from_record(reply_text(key), orjson.loads(reply_text(value)))
                if entry is not None:
                    table.put(entry)
            except (orjson.JSONDecodeError, ValueError):
                continue  # a record that does not parse allows nothing
        self._replace(table)
        self._version = version
        return True

    def _set_degraded(self, exc: BaseException) -> None:
        if not self._degraded:
            self._degraded = True
            self._log.warning(
                "redis_unavailable",
                component="allow",
                error=repr(exc),
                fallback="the entries last read stay until they end; changes are refused",
            )

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            self._log.info("redis_recovered", component="allow")

    async def _syncer(self) -> None:
        while True:
            await asyncio.sleep(self._sync_interval_s)
            try:
                await self.sync()
            except Exception as exc:  # a malformed answer must not stop the sync
                self._log.error("allow_sync_failed", error=repr(exc))

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            await self.sync()
            self._task = asyncio.create_task(self._syncer(), name="allow-sync")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
