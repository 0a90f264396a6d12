"""Rate limits shared by every replica, in Redis (standalone or Cluster).

Decisions
    One Lua script (``lua/gcra.lua``) makes GCRA decisions atomically on Redis's clock
    (``TIME``; the replicas' clocks differ), in integer microseconds, storing each
    key's TAT with an expiry at the instant its bucket is full again.  The emission
    interval is rounded up to a whole microsecond (a rate at most 1 ppm slower).
    Keys are ``<prefix>rl:{<policy>:<client key>}:<requests>:<period_s>:<burst>``
    (``gw:rl:{per-ip:203.0.113.7}:20:1.0:40``): the hash tag keeps a key in one slot,
    and the rate in the name means a policy whose rate changes starts afresh while the
    old keys expire by themselves (every replica agrees, whenever each reloads; a
    policy removed and put back unchanged before its keys expire finds its state
    again).  Scripts run by SHA (``EVALSHA``); after a ``NOSCRIPT`` (a restarted or
    failed-over Redis) the script is loaded again and the calls retried once.

Batching
    Decisions requested in the same event-loop turn share one round trip: they are
    queued, and a callback scheduled with ``call_soon`` sends them as one script call
    over all their keys (standalone), or one pipeline of script calls, one per hash
    slot (Cluster; redis-py splits the pipeline per node).  Up to
    ``max_inflight_batches`` round trips run at once (``max_batch`` checks each);
    beyond that, decisions wait for the next one and batches grow by themselves.
    Measured (``bench/bench_limiter.py``, 500 concurrent callers): about 6 times the
    decisions per second of one round trip per decision.

Local answers (``decide_local``)
    * A key Redis refused is answered "refused" locally until its retry time (a
      bounded cache, cleared when full): a client hammering while blocked costs no
      round trip.
    * While Redis is considered down (see below) the fallback answers synchronously.

Failures (``on_backend_error``)
    Every decision a round trip failed for (timeout, connection error, error reply)
    and every decision made while the breaker is open counts once in
    ``gateway_ratelimit_backend_errors_total`` and is answered by the fallback:
    ``local``: a :class:`MemoryLimiter` with each rate divided by the number of live
    replicas (each replica announces itself every 5 s in a sorted set with a 15 s
    TTL; the last count seen is used, at least 1); ``allow``: allowed; ``deny``:
    :class:`BackendUnavailable` from :meth:`decide`.
    A round trip is bounded by ``timeout_s`` (250 ms) from the moment the decision was
    queued, whatever Redis does.  After ``breaker_failures`` failed round trips in a
    row, Redis is skipped for ``breaker_open_s``; then one round trip probes it while
    the others keep using the fallback; its success closes the breaker.  The client
    reconnects by itself.  ``redis_unavailable`` is logged once when Redis starts
    failing, ``redis_recovered`` once when a round trip succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from gateway.core.gcra import Decision, Rate
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.stores.limiter import BackendUnavailable, Check, Clock, Limiter, bounded_key
from gateway.stores.memory_limiter import MemoryLimiter
from gateway.stores.redis_client import make_redis

__all__ = ["RedisLimiter", "load_script"]

OnBackendError = Literal["local", "allow", "deny"]


def load_script(name: str) -> str:
    return resources.files("gateway.stores").joinpath("lua", name).read_text("utf-8")


@dataclass(slots=True)
class _Pending:
    """One decide() call waiting for its round trip."""

    future: asyncio.Future[list[Decision]]
    checks: Sequence[Check]
    keys: list[bytes]
    decisions: list[Decision | None]  # filled in from the over-limit cache first
    queued_at: float  # loop time
    sent_at: float = 0.0  # limiter clock


@dataclass(frozen=True, slots=True)
class _PolicyKeys:
    rate: Rate
    head: bytes
    tail: bytes
    params: tuple[int, int]  # emission interval in microseconds, burst


class _Script:
    """A Lua script called by SHA, loaded again after NOSCRIPT."""

    def __init__(self, name: str) -> None:
        self.source = load_script(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def load(self, redis: Any) -> None:
        await redis.script_load(self.source)


class RedisLimiter(Limiter):
    """Rate limits in Redis, shared by all replicas (see the module docstring)."""

    def __init__(
        self,
        rates: Mapping[str, Rate],
        *,
        metrics: Metrics,
        redis_url: str | None = None,
        redis: Any = None,
        on_backend_error: OnBackendError = "local",
        max_keys: int = 1_000_000,
        clock: Clock = time.monotonic,
        key_prefix: str = "gw:",
        timeout_s: float = 0.25,
        breaker_failures: int = 3,
        breaker_open_s: float = 2.0,
        announce_interval_s: float = 5.0,
        replica_ttl_s: float = 15.0,
        replica_id: str | None = None,
        max_batch: int = 256,
        max_inflight_batches: int = 16,
        blocked_cache_size: int = 65_536,
    ) -> None:
        if redis is None:
            if not redis_url:
                raise ValueError("RedisLimiter needs a redis client or a redis_url")
            redis = make_redis(redis_url, socket_timeout_s=timeout_s)
            self._owns_redis = True
        else:
            self._owns_redis = False
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._metrics = metrics
        self._log = get_logger()
        self._on_error: OnBackendError = on_backend_error
        self._clock = clock
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        self._breaker_failures = breaker_failures
        self._breaker_open_s = breaker_open_s
        self._announce_interval_s = announce_interval_s
        self._replica_ttl_ms = int(replica_ttl_s * 1000)
        self._replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._replicas_key = f"{key_prefix}replicas"
        self._max_batch = max_batch
        self._max_inflight = max_inflight_batches
        self._blocked_cap = blocked_cache_size

        self._gcra = _Script("gcra.lua")
        self._announce_script = _Script("replicas.lua")
        self._policy_keys: dict[str, _PolicyKeys] = {}
        # key -> (refused until, full again at), on the limiter clock
        self._blocked: dict[bytes, tuple[float, float]] = {}

        self._replicas = 1
        self._divided: dict[Rate, Rate] = {}
        self._fallback = (
            MemoryLimiter(self._divide_all(rates), max_keys=max_keys, clock=clock)
            if on_backend_error == "local"
            else None
        )

        self._ok = True
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

        self._pending: list[_Pending] = []
        self._flush_handle: asyncio.Handle | None = None
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ Limiter API

    @property
    def backend_ok(self) -> bool:
        return self._ok

    @property
    def replicas(self) -> int:
        """Live replicas last seen in Redis (at least 1)."""
        return self._replicas

    def decide_local(self, checks: Sequence[Check]) -> list[Decision] | None:
        now = self._clock()
        if self._open_until and not self._may_try_redis(now):
            if self._on_error == "deny":
                return None  # decide() raises BackendUnavailable without I/O
            return self._fallback_decisions(checks)
        if not self._blocked:
            return None
        out = []
        for check in checks:
            decision = self._cached(self._key(check), now)
            if decision is None:
                return None
            out.append(decision)
        return out

    async def decide(self, checks: Sequence[Check]) -> list[Decision]:
        if not checks:
            return []
        now = self._clock()
        if self._open_until:
            if not self._may_try_redis(now):
                return self._fallback_or_raise(checks, now)
            self._probing = True  # this decision probes Redis; others keep the fallback
        keys = [self._key(c) for c in checks]
        decisions: list[Decision | None] = [None] * len(checks)
        if self._blocked:
            missing = False
            for i, key in enumerate(keys):
                decision = decisions[i] = self._cached(key, now)
                missing = missing or decision is None
            if not missing:
                self._probing = False
                return decisions  # type: ignore[return-value]
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future(), checks, keys, decisions, loop.time())
        self._pending.append(pending)
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)
        return await pending.future

    async def peek(self, checks: Sequence[Check]) -> list[Decision]:
        """Ask Redis without consuming (not batched, not cached: for /admin/explain)."""
        if not checks:
            return []
        try:
            if self._open_until and self._clock() < self._open_until:
                raise ConnectionError("circuit open")  # noqa: TRY301 - one fallback path
            async with asyncio.timeout(self._timeout_s):
                rows = await self._evaluate(
                    [(self._key(c), self._policy(c).params) for c in checks], consume=False
                )
        except Exception:
            if self._on_error == "deny":
                raise BackendUnavailable(self._retry_after(self._clock())) from None
            if self._fallback is not None:
                return self._fallback.peek_local(self._divided_checks(checks))
            return [self._optimistic(c.rate) for c in checks]
        return [self._row_decision(row) for row in rows]

    def reconfigure(self, rates: Mapping[str, Rate]) -> None:
        # Redis keys carry the rate: unchanged policies keep their keys, changed ones
        # get new keys (the old ones expire by themselves).
        self._policy_keys.clear()
        self._blocked.clear()
        if self._fallback is not None:
            self._fallback.reconfigure(self._divide_all(rates))

    async def start(self) -> None:
        """Start announcing this replica; never waits on Redis."""
        if self._fallback is not None:
            await self._fallback.start()
        if self._announcer is None and self._announce_interval_s > 0:
            self._announcer = asyncio.get_running_loop().create_task(
                self._announce_forever(), name="ratelimit-replica-announce"
            )

    async def close(self) -> None:
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcer
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await self._run_announce(live=False)
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._fallback is not None:
            await self._fallback.close()
        if self._owns_redis:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # ------------------------------------------------------------------ keys and cache

    def _policy(self, check: Check) -> _PolicyKeys:
        pk = self._policy_keys.get(check.policy)
        rate = check.rate
        if pk is None or (pk.rate is not rate and pk.rate != rate):
            emission_us = max(1, math.ceil(rate.period_s * 1_000_000 / rate.requests - 1e-6))
            pk = _PolicyKeys(
                rate,
                f"{self._prefix}rl:{{{check.policy}:".encode(),
                f"}}:{rate.requests}:{rate.period_s!r}:{rate.burst}".encode(),
                (emission_us, rate.burst),
            )
            self._policy_keys[check.policy] = pk
        return pk

    def _key(self, check: Check) -> bytes:
        pk = self._policy(check)
        return pk.head + bounded_key(check.key).encode("utf-8", "surrogatepass") + pk.tail

    def _cached(self, key: bytes, now: float) -> Decision | None:
        entry = self._blocked.get(key)
        if entry is None:
            return None
        until, full_at = entry
        if now >= until:
            del self._blocked[key]
            return None
        return Decision(
            allowed=False, remaining=0, retry_after_s=until - now, reset_s=full_at - now
        )

    # ------------------------------------------------------------------ batching

    def _flush(self) -> None:
        self._flush_handle = None
        loop = asyncio.get_running_loop()
        queue = self._pending
        while queue and self._inflight < self._max_inflight:
            taken = size = 0
            while taken < len(queue) and size < self._max_batch:
                size += len(queue[taken].checks)
                taken += 1
            batch = queue[:taken]
            del queue[:taken]
            self._inflight += 1
            task = loop.create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            await self._decide_batch(batch)
        finally:
            self._inflight -= 1
            if self._pending and self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    async def _decide_batch(self, batch: list[_Pending]) -> None:
        items: list[tuple[_Pending, int]] = []
        calls: list[tuple[bytes, tuple[int, int]]] = []
        sent_at = self._clock()
        for pending in batch:
            pending.sent_at = sent_at
            for i, decision in enumerate(pending.decisions):
                if decision is None:
                    check = pending.checks[i]
                    items.append((pending, i))
                    calls.append((pending.keys[i], self._policy(check).params))
        try:
            async with asyncio.timeout_at(batch[0].queued_at + self._timeout_s):
                rows = await self._evaluate(calls, consume=True)
        except asyncio.CancelledError:
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as exc:
            self._on_failure(exc)
            now = self._clock()
            for pending in batch:
                if not pending.future.done():
                    self._complete_with_fallback(pending, now)
            return
        self._on_success()
        blocked = self._blocked
        for (pending, i), row in zip(items, rows, strict=True):
            decision = pending.decisions[i] = self._row_decision(row)
            if not decision.allowed:
                if len(blocked) >= self._blocked_cap:
                    blocked.clear()  # O(n) once per cap insertions: amortised O(1)
                blocked[pending.keys[i]] = (
                    sent_at + decision.retry_after_s,
                    sent_at + decision.reset_s,
                )
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result(pending.decisions)  # type: ignore[arg-type]

    async def _evaluate(
        self, calls: Sequence[tuple[bytes, tuple[int, int]]], *, consume: bool
    ) -> list[list[int]]:
        """Run the GCRA script for every (key, (emission_us, burst)); one row per call."""
        flag = "1" if consume else "0"
        if not self._cluster:
            groups = [list(range(len(calls)))]
        else:
            by_slot: dict[int, list[int]] = {}
            for i, (key, _) in enumerate(calls):
                by_slot.setdefault(key_slot(key), []).append(i)
            groups = list(by_slot.values())
        replies = await self._run_groups(calls, groups, flag)
        rows: list[list[int]] = [[] for _ in calls]
        for group, reply in zip(groups, replies, strict=True):
            for j, index in enumerate(group):
                rows[index] = reply[4 * j : 4 * j + 4]
        return rows

    async def _run_groups(
        self,
        calls: Sequence[tuple[bytes, tuple[int, int]]],
        groups: list[list[int]],
        flag: str,
    ) -> list[Any]:
        """One script call per group: a single EVALSHA, or a pipeline of them.

        Arguments stay few (packing them is the client's main cost): the keys, then one
        string of rate indexes, then each distinct rate once.
        """
        sha = self._gcra.sha
        commands: list[tuple[Any, ...]] = []
        for group in groups:
            rates: dict[tuple[int, int], int] = {}
            indexes = []
            for i in group:
                params = calls[i][1]
                index = rates.get(params)
                if index is None:
                    index = rates[params] = len(rates) + 1
                indexes.append(str(index))
            args: list[Any] = [sha, len(group)]
            args += [calls[i][0] for i in group]
            args += (flag, " ".join(indexes))
            for emission_us, burst in rates:
                args += (emission_us, burst)
            commands.append(tuple(args))
        if len(commands) == 1:
            try:
                return [await self._redis.evalsha(*commands[0])]
            except NoScriptError:
                await self._gcra.load(self._redis)
                return [await self._redis.evalsha(*commands[0])]
        replies = await self._pipeline(commands)
        redo = [i for i, r in enumerate(replies) if isinstance(r, Exception)]
        if redo:
            if not all(isinstance(replies[i], NoScriptError) for i in redo):
                raise replies[redo[0]]
            await self._gcra.load(self._redis)
            again = await self._pipeline([commands[i] for i in redo])
            for i, reply in zip(redo, again, strict=True):
                if isinstance(reply, Exception):
                    raise reply
                replies[i] = reply
        return replies

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                # execute_command: redis-py's cluster pipeline refuses .evalsha() by name,
                # but routes EVALSHA by its keys (one slot per command here)
                pipe.execute_command("EVALSHA", *command)
            return list(await pipe.execute(raise_on_error=False))

    @staticmethod
    def _row_decision(row: Sequence[int]) -> Decision:
        allowed, remaining, retry_us, reset_us = row
        return Decision(bool(allowed), int(remaining), retry_us / 1e6, reset_us / 1e6)

    # ------------------------------------------------------------------ failures

    def _may_try_redis(self, now: float) -> bool:
        """Whether a decision may go to Redis now (breaker closed, or a probe is due)."""
        return now >= self._open_until and not self._probing

    def _on_failure(self, exc: BaseException) -> None:
        self._probing = False
        self._failures += 1
        if self._ok:
            self._ok = False
            self._log.warning(
                "redis_unavailable",
                component="ratelimit",
                error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                fallback=self._on_error,
            )
        if self._failures >= self._breaker_failures:
            self._open_until = self._clock() + self._breaker_open_s

    def _on_success(self) -> None:
        self._probing = False
        self._failures = 0
        self._open_until = 0.0
        if not self._ok:
            self._ok = True
            self._log.info("redis_recovered", component="ratelimit")

    def _retry_after(self, now: float) -> float:
        return max(1.0, self._open_until - now)

    def _fallback_or_raise(self, checks: Sequence[Check], now: float) -> list[Decision]:
        if self._on_error == "deny":
            self._metrics.ratelimit_backend_errors.inc(len(checks))
            raise BackendUnavailable(self._retry_after(now))
        return self._fallback_decisions(checks)

    def _fallback_decisions(self, checks: Sequence[Check]) -> list[Decision]:
        self._metrics.ratelimit_backend_errors.inc(len(checks))
        if self._fallback is not None:
            return self._fallback.decide_local(self._divided_checks(checks))
        return [self._optimistic(c.rate) for c in checks]

    def _complete_with_fallback(self, pending: _Pending, now: float) -> None:
        missing = [i for i, d in enumerate(pending.decisions) if d is None]
        if self._on_error == "deny":
            self._metrics.ratelimit_backend_errors.inc(len(missing))
            pending.future.set_exception(BackendUnavailable(self._retry_after(now)))
            return
        answers = self._fallback_decisions([pending.checks[i] for i in missing])
        for i, decision in zip(missing, answers, strict=True):
            pending.decisions[i] = decision
        pending.future.set_result(pending.decisions)  # type: ignore[arg-type]

    @staticmethod
    def _optimistic(rate: Rate) -> Decision:
        return Decision(
            allowed=True, remaining=rate.burst - 1, retry_after_s=0.0, reset_s=rate.emission_s
        )

    # ------------------------------------------------------------------ replicas

    def _divide(self, rate: Rate) -> Rate:
        divided = self._divided.get(rate)
        if divided is None:
            n = self._replicas
            divided = (
                rate if n == 1 else Rate(rate.requests, rate.period_s * n, -(-rate.burst // n))
            )
            self._divided[rate] = divided
        return divided

    def _divide_all(self, rates: Mapping[str, Rate]) -> dict[str, Rate]:
        return {name: self._divide(rate) for name, rate in rates.items()}

    def _divided_checks(self, checks: Sequence[Check]) -> list[Check]:
        return [Check(c.policy, self._divide(c.rate), c.key) for c in checks]

    async def announce(self) -> int:
        """Announce this replica now and refresh the count of live ones (kept on error)."""
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                count = max(1, await self._run_announce(live=True))
        except Exception:
            return self._replicas  # the last count seen stays in force
        if count != self._replicas:
            self._replicas = count
            self._divided.clear()
        return count

    async def _run_announce(self, *, live: bool) -> int:
        script = self._announce_script
        args = (1, self._replicas_key, self._replica_id, self._replica_ttl_ms, "1" if live else "0")
        try:
            return int(await self._redis.evalsha(script.sha, *args))
        except NoScriptError:
            await script.load(self._redis)
            return int(await self._redis.evalsha(script.sha, *args))

    async def _announce_forever(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s * 4):
                await self._gcra.load(self._redis)
        while True:
            await self.announce()
            await asyncio.sleep(self._announce_interval_s)
