"""Replica announcements: how many gateways share the Redis limits right now.

Each replica announces itself every ``announce_interval_s`` (5 s) in a sorted set with
a ``replica_ttl_s`` (15 s) TTL (``lua/replicas.lua``), and withdraws on close.  While
Redis is unreachable, the ``local`` fallback applies each rate divided by the last count
seen (at least 1), so the replicas together admit about what the shared limit would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.core.gcra import Rate
from gateway.stores.limiter import Check
from gateway.stores.redis.scripts import Script

__all__ = ["Replicas"]


class Replicas:
    """This replica's announcements, the count of live ones, and rates divided by it."""

    __slots__ = ("_count", "_divided", "_id", "_key", "_redis", "_script", "_timeout_s", "_ttl_ms")

    def __init__(
        self, redis: Any, *, key: str, replica_id: str, ttl_s: float, timeout_s: float
    ) -> None:
        self._redis = redis
        self._key = key
        self._id = replica_id
        self._ttl_ms = int(ttl_s * 1000)
        self._timeout_s = timeout_s
        self._script = Script("replicas.lua")
        self._count = 1
        self._divided: dict[Rate, Rate] = {}

    @property
    def count(self) -> int:
        """Live replicas last seen in Redis (at least 1)."""
        return self._count

    def divide(self, rate: Rate) -> Rate:
        divided = self._divided.get(rate)
        if divided is None:
            n = self._count
            if n == 1:
                divided = rate
            elif rate.calendar is not None:  # a calendar quota: a share of it each
                divided = Rate.quota(-(-rate.requests // n), rate.calendar)
            else:
                divided = Rate(rate.requests, rate.period_s * n, -(-rate.burst // n))
            self._divided[rate] = divided
        return divided

    def divide_all(self, rates: Mapping[str, Rate]) -> dict[str, Rate]:
        return {name: self.divide(rate) for name, rate in rates.items()}

    def divided_checks(self, checks: Sequence[Check]) -> list[Check]:
        return [Check(c.policy, self.divide(c.rate), c.key, c.cost) for c in checks]

    async def announce(self) -> int:
        """Announce this replica now and refresh the count of live ones (kept on error)."""
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                count = max(1, await self.run(live=True))
        except Exception:
            return self._count  # the last count seen stays in force
        if count != self._count:
            self._count = count
            self._divided.clear()
        return count

    async def run(self, *, live: bool) -> int:
        """One announcement (``live``) or withdrawal; the count of live replicas."""
        args = (self._id, self._ttl_ms, "1" if live else "0")
        return int(await self._script.run(self._redis, (self._key,), args))
