"""In-process rate limiting: one TAT (a float) per key, bounded, safe under a key spray.

State
    Per policy a table: ``dict`` key -> TAT, plus a ``list`` holding the same keys (the
    *ring*) so that keys can be visited in O(1) without scanning the dict.  IPv4 and
    IPv6 keys (addresses or ``/64`` networks) are stored as ints (32-48 bytes instead
    of a 60-80 byte str); other keys as str, digested when long
    (:func:`~gateway.stores.limiter.bounded_key`).  ``bench/bench_limiter.py`` measures
    the bytes per key.

Reclaim
    A key whose TAT is in the past has a full bucket, which is what an absent key has:
    it can be dropped without changing any answer.  Each insertion first visits the
    next two ring entries (a clock hand) and drops the refilled ones; a background task
    visits more when idle.  Work is O(1) per decision; nothing scans the whole table on
    the hot path.  A visited key is removed from the ring by moving the last entry into
    its place.

The hard cap (``rate_limit.max_keys``, all policies together)
    A spray of distinct keys (addresses, header values) could otherwise grow the
    tables without bound, and the obvious remedy, evicting keys, would hand the
    evicted key a fresh bucket the next time it shows up: an attacker cycling through
    more keys than the cap would never be limited.  So:

    * At the cap, one key is evicted per insertion, from the largest table: among the
      next eight ring entries, a refilled one if any (that costs nothing), else the one
      *closest to refilled* (smallest TAT), i.e. the client with the most budget left,
      who loses least by being forgotten and is the least likely to be an attacker.
    * The evicted TAT is remembered in a fixed-size *ghost* array of that table
      (created on the first eviction; ``max_keys / 2`` doubles, 4 MB at the default
      cap, against ~100 MB for the table itself), at a slot chosen by a salted hash of
      the key, keeping the larger TAT when two keys share a slot.  A key evicted owing
      at most one request (TAT within one emission interval) is forgotten outright:
      coming back it gains at most that one request, which it would have regained
      within ``period_s / requests`` anyway.
    * A key that is not in the table starts from the ghost TAT of its slot when that is
      still in the future.  An evicted key therefore comes back with at most the budget
      it had when evicted (plus at most one request), never a fresh bucket.  In effect,
      while the table is full, the keys it could not keep share one bucket per ghost
      slot: the limit degrades from per key to per slot (``max_keys / 2`` slots)
      instead of disappearing.  The price falls on a new client whose slot holds an
      evicted key's future TAT: it starts with what that key had left.  A spray of
      one request per address costs new clients nothing; a spray of addresses that
      each use several requests costs a fraction of new clients part of their budget,
      for at most ``burst * period_s / requests`` after the spray stops.  Clients
      already in the table are never touched by the ghost.

Reload
    :meth:`MemoryLimiter.reconfigure` keeps the tables of policies whose rate is
    unchanged and drops the others.  A check is always decided with its own rate, so a
    request still holding the previous config during a reload is decided against the
    current state at the rate it knows.

Calendar quotas
    A policy with a ``period`` (hour, day, month) is decided by
    :func:`gateway.core.calendar.decide_quota` on its virtual clock (the window's number
    times the quota), read from an injectable wall clock (UTC): its table is swept and
    evicted against that clock as the others are against the monotonic one, and a key
    of an ended window reads as refilled.

Time comes from an injectable monotonic clock (and a wall clock for calendar quotas).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from array import array
from collections.abc import Mapping, Sequence

from gateway.core.calendar import WindowClock, decide_quota
from gateway.core.gcra import Decision, Rate, decide
from gateway.stores.limiter import Check, Clock, Limiter, bounded_key, unlimited
from gateway.tasks import stop_task

__all__ = ["MemoryLimiter", "compact_key"]

_SWEEP_PER_INSERT = 2
_RECENT_KEYS = 4096  # compact forms remembered (cleared when full): a dict hit, not a parse
_ADDRESS_CHARS = 49  # the longest key compact_key can turn into an int ("addr/prefix")
_EVICTION_SAMPLE = 8
_MIX = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, odd: spreads hash bits
_MASK64 = (1 << 64) - 1
_IPV6_TAG = 1 << 128  # keeps IPv6 ints apart from IPv4 ones

_pton = socket.inet_pton
_from_bytes = int.from_bytes
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_HEX = frozenset("0123456789abcdefABCDEF")


def compact_key(key: str) -> int | str:
    """The smallest exact representation of a client key, for a dict.

    ``203.0.113.7`` -> int; ``2001:db8::1`` and ``2001:db8:1:2::/64`` (an IPv6 client
    keyed by its network) -> int tagged apart from IPv4; anything else -> str.
    """
    first = key[:1]
    if first.isdigit() and len(key) <= 15 and key[-1].isdigit():
        try:
            return _from_bytes(_pton(_AF_INET, key), "big")
        except (OSError, ValueError):  # not an address (ValueError: a NUL inside)
            pass
    elif ":" in key and len(key) <= _ADDRESS_CHARS and (first in _HEX or first == ":"):
        address, slash, prefix = key.partition("/")
        try:
            value = _from_bytes(_pton(_AF_INET6, address), "big") | _IPV6_TAG
        except (OSError, ValueError):  # not an address (ValueError: a NUL inside)
            pass
        else:
            if not slash:
                return value
            if prefix.isascii() and prefix.isdigit() and len(prefix) <= 3:
                return value | (int(prefix) << 129)
    return bounded_key(key)


class _Table:
    """The state of one policy."""

    __slots__ = ("cursor", "ghost", "rate", "ring", "tats", "windows")

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self.tats: dict[int | str, float] = {}
        self.ring: list[int | str] = []
        self.cursor = 0
        self.ghost: array[float] | None = None
        # a calendar quota's current window (None: a rolling rate)
        self.windows = WindowClock(rate.calendar) if rate.calendar is not None else None


class MemoryLimiter(Limiter):
    """Rate limits held in this process (see the module docstring)."""

    def __init__(
        self,
        rates: Mapping[str, Rate],
        *,
        max_keys: int = 1_000_000,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sweep_interval_s: float = 1.0,
        sweep_batch: int = 20_000,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._clock = clock
        self.wall_clock = wall_clock
        self._max_keys = max_keys
        self._count = 0
        self._recent: dict[str, int | str] = {}  # key -> compact_key(key), bounded
        self._tables: dict[str, _Table] = {name: _Table(rate) for name, rate in rates.items()}
        self._salt = secrets.randbits(64)
        ghost_bits = 10
        while (1 << ghost_bits) < max_keys // 2:
            ghost_bits += 1
        self._ghost_slots = 1 << ghost_bits
        self._ghost_shift = 64 - ghost_bits
        self._sweep_interval_s = sweep_interval_s
        self._sweep_batch = sweep_batch
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ Limiter API

    def decide_local(self, checks: Sequence[Check]) -> list[Decision]:
        now = self._clock()
        tables = self._tables
        out: list[Decision] = []
        last_key = None
        compact: int | str = ""
        for c in checks:  # policies keyed alike (two on the client address) share one key
            if c.key != last_key:
                last_key = c.key
                compact = self._compact(last_key)
            table = tables.get(c.policy)
            rate = c.rate
            if table is not None and table.windows is None and rate.calendar is None:
                tats = table.tats
                tat = tats.get(compact)
                if tat is not None:  # a known key, decided inline (as in decide_key)
                    decision, new_tat = decide(tat, now, rate, c.cost)
                    if decision.allowed:
                        tats[compact] = new_tat
                    out.append(decision)
                    continue
            out.append(self._decide(c.policy, rate, compact, now, c.cost, commit=True))
        return out

    def _compact(self, key: str) -> int | str:
        """:func:`compact_key`, remembered for short keys (a dict hit, not a parse)."""
        recent = self._recent
        compact = recent.get(key)
        if compact is None:
            compact = compact_key(key)
            if len(key) <= _ADDRESS_CHARS:  # addresses; never a long header-derived key
                if len(recent) >= _RECENT_KEYS:
                    recent.clear()
                recent[key] = compact
        return compact

    def decide_key(
        self, policies: Sequence[tuple[str, Rate]], key: str, cost: int = 1
    ) -> list[Decision]:
        now = self._clock()
        compact = self._recent.get(key)
        if compact is None:
            compact = self._compact(key)
        tables = self._tables
        out: list[Decision] = []
        for name, rate in policies:
            table = tables.get(name)
            if table is not None and table.windows is None and rate.calendar is None:
                tats = table.tats
                tat = tats.get(compact)
                if tat is not None:  # a known key, decided inline
                    decision, new_tat = decide(tat, now, rate, cost)
                    if decision.allowed:
                        tats[compact] = new_tat
                    out.append(decision)
                    continue
            # a new key (or policy): insertion, ghost, sweep
            out.append(self._decide(name, rate, compact, now, cost, commit=True))
        return out

    async def decide(self, checks: Sequence[Check]) -> list[Decision]:
        return self.decide_local(checks)

    async def peek(self, checks: Sequence[Check]) -> list[Decision]:
        return self.peek_local(checks)

    def peek_local(self, checks: Sequence[Check]) -> list[Decision]:
        now = self._clock()
        return [
            self._decide(c.policy, c.rate, compact_key(c.key), now, c.cost, commit=False)
            for c in checks
        ]

    def reconfigure(self, rates: Mapping[str, Rate]) -> None:
        tables = self._tables
        for name in list(tables):
            if rates.get(name) != tables[name].rate:
                self._count -= len(tables.pop(name).tats)
        for name, rate in rates.items():
            if name not in tables:
                tables[name] = _Table(rate)

    async def start(self) -> None:
        if self._task is None and self._sweep_interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(
                self._sweep_forever(), name="ratelimit-memory-sweep"
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    # ------------------------------------------------------------------ inspection

    @property
    def key_count(self) -> int:
        """Keys held, all policies together (never above ``max_keys``)."""
        return self._count

    def sweep(self, max_entries: int | None = None) -> int:
        """Visit up to ``max_entries`` keys (all when ``None``); drop the refilled ones."""
        removed = 0
        for table in list(self._tables.values()):
            budget = len(table.ring) if max_entries is None else max_entries
            removed += self._sweep_table(table, self._now_of(table), budget)
        return removed

    # ------------------------------------------------------------------ internals

    def _now_of(self, table: _Table) -> float:
        """The time a table's TATs are read against: the monotonic clock, or a calendar
        quota's virtual clock (the window's number times the quota)."""
        windows = table.windows
        if windows is None:
            return self._clock()
        return float(windows.at(self.wall_clock()).number * table.rate.burst)

    def _decide(
        self, policy: str, rate: Rate, key: int | str, now: float, cost: int, *, commit: bool
    ) -> Decision:
        """One request of ``key`` (in its compact form) under ``policy``."""
        table = self._tables.get(policy)
        if table is None:
            # A policy not (yet) announced by reconfigure(): start a table for it.
            table = self._tables[policy] = _Table(rate)
        elif table.rate.calendar != rate.calendar:
            # a request still holding the config before a reload that turned the policy
            # into a calendar quota or back: its state is not this rate's; let it pass
            # without touching the state of the config in force
            return unlimited(rate, cost)
        if table.windows is not None:
            return self._decide_quota(table, rate, key, cost, commit=commit)
        tats = table.tats
        tat = tats.get(key)
        if tat is not None:  # a known key: no insertion, no ghost
            decision, new_tat = decide(tat, now, rate, cost)
            if commit and decision.allowed:
                tats[key] = new_tat
            return decision
        ghost = table.ghost
        if ghost is not None:
            remembered = ghost[self._slot(key)]
            if remembered > now:
                tat = remembered
        decision, new_tat = decide(tat, now, rate, cost)
        if commit and decision.allowed:
            self._insert(table, key, new_tat, now)
        return decision

    def _decide_quota(
        self, table: _Table, rate: Rate, key: int | str, cost: int, *, commit: bool
    ) -> Decision:
        """One request under a calendar quota (:mod:`gateway.core.calendar`)."""
        assert table.windows is not None  # noqa: S101 - a calendar table
        wall = self.wall_clock()
        window = table.windows.at(wall)
        vnow = float(window.number * rate.burst)
        tats = table.tats
        tat = tats.get(key)
        known = tat is not None
        if not known and table.ghost is not None:
            remembered = table.ghost[self._slot(key)]
            if remembered > vnow:
                tat = remembered
        decision, new_tat = decide_quota(tat, wall, window, rate, cost)
        if commit and decision.allowed:
            if known:
                tats[key] = new_tat
            else:
                self._insert(table, key, new_tat, vnow)
        return decision

    def _slot(self, key: int | str) -> int:
        # multiplicative (Fibonacci) hashing: the top bits of a 64-bit product
        return (((hash(key) ^ self._salt) * _MIX) & _MASK64) >> self._ghost_shift

    def _insert(self, table: _Table, key: int | str, tat: float, now: float) -> None:
        self._sweep_table(table, now, _SWEEP_PER_INSERT)
        if self._count >= self._max_keys:
            self._evict()
        table.tats[key] = tat
        table.ring.append(key)
        self._count += 1

    def _remove_at(self, table: _Table, index: int) -> None:
        ring = table.ring
        last = ring.pop()
        if index < len(ring):
            del table.tats[ring[index]]
            ring[index] = last
        else:
            del table.tats[last]
        self._count -= 1

    def _sweep_table(self, table: _Table, now: float, budget: int) -> int:
        ring, tats = table.ring, table.tats
        i = table.cursor
        removed = 0
        for _ in range(budget):
            if not ring:
                break
            if i >= len(ring):
                i = 0
            if tats[ring[i]] <= now:
                self._remove_at(table, i)  # the moved-in last entry is visited next
                removed += 1
            else:
                i += 1
        table.cursor = i
        return removed

    def _evict(self) -> None:
        table = max(self._tables.values(), key=lambda t: len(t.ring))
        ring, tats = table.ring, table.tats
        size = len(ring)
        if size == 0:
            return
        now = self._now_of(table)
        start = table.cursor % size
        best_index = start
        best_tat = tats[ring[start]]
        for step in range(1, min(_EVICTION_SAMPLE, size)):
            index = (start + step) % size
            tat = tats[ring[index]]
            if tat < best_tat:
                best_index, best_tat = index, tat
        table.cursor = (start + _EVICTION_SAMPLE) % size
        if best_tat - now > table.rate.emission_s:
            ghost = table.ghost
            if ghost is None:
                ghost = table.ghost = array("d", bytes(8 * self._ghost_slots))
            slot = self._slot(ring[best_index])
            ghost[slot] = max(ghost[slot], best_tat)
        self._remove_at(table, best_index)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            self.sweep(self._sweep_batch)
