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
    again).  Scripts run by SHA (:mod:`gateway.stores.redis.scripts`).

Batching
    Decisions requested in the same event-loop turn share one round trip
    (:mod:`gateway.stores.redis.batch`); the script's calls are
    :mod:`gateway.stores.redis.gcra_calls`.

Connections
    Standalone Redis (``redis://``, ``rediss://``, ``unix://``) is reached for
    decisions through :mod:`gateway.stores.redis.resp`: one pipelined connection of the
    limiter's own, commands packed by hand, replies parsed by hiredis, no task,
    context manager or pool per round trip (a batch is written, and its reply handled,
    in callbacks).  Redis Cluster, and clients whose settings that connection does not
    speak (Sentinel pools, credential providers), go through redis-py.  Replica
    announcements (:mod:`gateway.stores.redis.replicas`) always use redis-py (the
    client passed in, or one made from the URL): they are not on the request path.
    ``bench/bench_limiter.py`` compares the two ways and the memory backend.

Local answers (``decide_local``)
    A key Redis refused is answered "refused" locally until its retry time (a bounded
    cache, cleared when full): a client hammering while blocked costs no round trip.
    While Redis is considered down (see below) the fallback answers synchronously.

Failures (``on_backend_error``)
    The fallback and the breaker around Redis: :mod:`gateway.stores.redis.outage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.batchwrite import SERVING
from gateway.core.gcra import Decision, Rate
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.stores.limiter import BackendUnavailable, Check, Clock, Limiter, unlimited
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.redis.batch import Batch, Part
from gateway.stores.redis.client import make_redis
from gateway.stores.redis.gcra_calls import (
    REPLY_WIDTH,
    Discard,
    PolicyKeys,
    decision_of,
    evalsha_head,
    evaluate,
    pack_evalsha,
    peek_lean,
    raw_key,
)
from gateway.stores.redis.outage import OnBackendError, OutageHandling
from gateway.stores.redis.replicas import Replicas
from gateway.stores.redis.resp import Endpoint, RespClient
from gateway.stores.redis.scripts import Script, is_noscript
from gateway.tasks import stop_task

__all__ = ["RedisLimiter"]

_tuple_new = tuple.__new__


class RedisLimiter(OutageHandling, Limiter):
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
        endpoint = None if self._cluster else Endpoint.from_client(redis)
        # decisions and peeks of standalone Redis: the lean connection (module docstring)
        self._client = (
            RespClient(endpoint, connect_timeout_s=timeout_s) if endpoint is not None else None
        )
        self._metrics = metrics
        self._log = get_logger()
        self._on_error: OnBackendError = on_backend_error
        self._clock = clock
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        self._announce_interval_s = announce_interval_s
        self._max_batch = max_batch
        self._max_inflight = max_inflight_batches
        self._blocked_cap = blocked_cache_size

        self._gcra = Script("gcra.lua")
        self._evalsha_head = evalsha_head(self._gcra)
        self._on_batch_reply = self._on_reply  # bound once, handed to every batch
        self._policy_keys: dict[str, PolicyKeys] = {}
        # id(a route's policies) -> (those policies, their key parts), for submit_key
        self._route_keys: dict[int, tuple[Sequence[tuple[str, Rate]], list[PolicyKeys]]] = {}
        # key (a RESP bulk string) -> (refused until, full again at, the refused request's
        # cost), limiter clock
        self._blocked: dict[bytes, tuple[float, float, int]] = {}
        self._blocked_until = 0.0  # when the last refusal in the cache ends

        self._replicas = Replicas(
            redis,
            key=f"{key_prefix}replicas",
            replica_id=replica_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}",
            ttl_s=replica_ttl_s,
            timeout_s=timeout_s,
        )
        self._fallback = (
            MemoryLimiter(self._replicas.divide_all(rates), max_keys=max_keys, clock=clock)
            if on_backend_error == "local"
            else None
        )

        self._init_breaker(breaker_failures, breaker_open_s)
        self._queue: deque[Batch] = deque()  # batches not sent yet, oldest first
        self._open: Batch | None = None  # the batch new checks join (the newest queued)
        self._flush_handle: asyncio.Handle | None = None
        self._inflight = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of the first decision
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ Limiter API

    @property
    def backend_ok(self) -> bool:
        return self._ok

    @property
    def replicas(self) -> int:
        """Live replicas last seen in Redis (at least 1)."""
        return self._replicas.count

    def decide_key(
        self, policies: Sequence[tuple[str, Rate]], key: str, cost: int = 1
    ) -> list[Decision] | None:
        # Refused keys are answered by submit() from the local cache, with a finished
        # future (no round trip, no wait): here only the open breaker's fallback.
        if not self._open_until:
            return None
        return super().decide_key(policies, key, cost)

    def decide_local(self, checks: Sequence[Check]) -> list[Decision] | None:
        if not (self._open_until or self._blocked):
            return None
        now = self._clock()
        if self._open_until and not self._may_try_redis(now):
            if self._on_error == "deny":
                return None  # decide() raises BackendUnavailable without I/O
            return self._fallback_decisions(checks)
        if not self._still_blocked(now):
            return None
        out = []
        for check in checks:
            decision = self._cached(self._key(check), now, check.cost)
            if decision is None:
                return None
            out.append(decision)
        return out

    async def decide(self, checks: Sequence[Check]) -> list[Decision]:
        return await self.submit(checks)

    def submit_key(
        self, policies: Sequence[tuple[str, Rate]], key: str, cost: int = 1
    ) -> Awaitable[list[Decision]]:
        """:meth:`submit` for a route's policies on one key (the client's address): no
        Check built by the caller, the key encoded once, the policies' key parts cached
        per route."""
        loop = self._loop
        if self._open_until or self._blocked or loop is None or loop.is_closed() or not policies:
            return self.submit(
                [_tuple_new(Check, (name, rate, key, cost)) for name, rate in policies]
            )
        entry = self._route_keys.get(id(policies))
        if entry is None or entry[0] is not policies:
            entry = self._route_entry(policies)
        future: asyncio.Future[list[Decision]] = loop.create_future()
        batch = self._batch(loop)
        start = len(batch.keys)
        # list.append called on the list, never bound: a compiled build calls a bound
        # method as any Python callable, and list.append itself directly
        for pk in entry[1]:
            batch.keys.append(pk.bulk_of(key))
        batch.pks += entry[1]
        if cost != 1 or batch.costs is not None:
            batch.add_costs(start, [cost] * len(policies))
        if len(batch.keys) >= self._max_batch:
            self._open = None  # full: the next decision starts another batch
        # the Check objects only if the fallback needs them (Part.sent)
        batch.parts.append(Part(future, start, len(policies), None, None, policies, key, cost))
        return self._sent(future)

    def _route_entry(
        self, policies: Sequence[tuple[str, Rate]]
    ) -> tuple[Sequence[tuple[str, Rate]], list[PolicyKeys]]:
        cache = self._route_keys
        if len(cache) >= 256:
            cache.clear()  # routes of many reloads ago
        entry = (policies, [self._policy(Check(name, rate, "")) for name, rate in policies])
        cache[id(policies)] = entry  # the entry holds the policies: their id is not reused
        return entry

    def _batch(self, loop: asyncio.AbstractEventLoop) -> Batch:
        """The batch new checks join; a new one, queued, when there is none open."""
        batch = self._open
        if batch is None:
            batch = self._open = Batch(self._on_batch_reply, loop.time() + self._timeout_s)
            self._queue.append(batch)
            # the proxy port's one request in flight: sent by the caller once its checks
            # are in (nothing would join it, and waiting costs a round of the loop); else
            # at the round's end
            if self._flush_handle is None and SERVING.active != 1:
                self._flush_handle = loop.call_soon(self._flush)
        return batch

    def _sent(self, future: asyncio.Future[list[Decision]]) -> asyncio.Future[list[Decision]]:
        """``future``, its batch sent first when nothing is to wait for the round's end."""
        if self._flush_handle is None:
            self._flush()
        return future

    def submit(self, checks: Sequence[Check]) -> Awaitable[list[Decision]]:
        """The decisions as a future: the caller awaits it, no coroutine in between."""
        loop = self._loop
        if loop is None or loop.is_closed():
            # once: asyncio.get_running_loop() is a getpid() system call on Python 3.11
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Decision]] = loop.create_future()
        if not checks:
            future.set_result([])
            return future
        keys: list[bytes] | None = None
        cached: list[Decision | None] | None = None
        if self._open_until or self._blocked:
            now = self._clock()
            if self._open_until:
                if not self._may_try_redis(now):
                    future.set_result(self._fallback_or_raise(checks, now))
                    return future
                self._probing = True  # this decision probes Redis; others keep the fallback
            if self._still_blocked(now):
                keys = [self._key(c) for c in checks]
                cached = [
                    self._cached(key, now, check.cost)
                    for key, check in zip(keys, checks, strict=True)
                ]
                if all(d is not None for d in cached):
                    self._probing = False
                    future.set_result(cached)  # type: ignore[arg-type]
                    return future
        batch = self._batch(loop)
        start = len(batch.keys)
        if cached is None:
            self._add_checks(batch, start, checks)
            sent: Sequence[Check] = checks
        else:
            assert keys is not None  # noqa: S101 - computed with cached
            sent = []
            for check, key, decision in zip(checks, keys, cached, strict=True):
                if decision is None:
                    sent.append(check)
                    batch.keys.append(key)
                    batch.pks.append(self._policy(check))
            batch.add_costs(start, [check.cost for check in sent])
        if len(batch.keys) >= self._max_batch:
            self._open = None  # full: the next decision starts another batch
        batch.parts.append(Part(future, start, len(checks), cached, sent))
        return self._sent(future)

    def _add_checks(self, batch: Batch, start: int, checks: Sequence[Check]) -> None:
        """Every check of a decision into ``batch``, from ``start`` on."""
        keys, pks = batch.keys, batch.pks
        costly = False
        for check in checks:
            pk = self._policy(check)
            pks.append(pk)
            keys.append(pk.bulk_of(check.key))
            if check.cost != 1:
                costly = True
        if costly or batch.costs is not None:  # no list of costs while each costs 1
            batch.add_costs(start, [check.cost for check in checks])

    async def peek(self, checks: Sequence[Check]) -> list[Decision]:
        """Ask Redis without consuming (not batched, not cached: for /admin/explain)."""
        if not checks:
            return []
        try:
            if self._open_until and self._clock() < self._open_until:
                raise ConnectionError("circuit open")  # noqa: TRY301 - one fallback path
            keys = [self._key(c) for c in checks]
            pks = [self._policy(c) for c in checks]
            costs = [c.cost for c in checks]
            if self._client is not None:
                payload = pack_evalsha(self._evalsha_head, keys, pks, b"0", costs)
                reply = await peek_lean(self._client, self._gcra, payload, self._timeout_s)
            else:
                async with asyncio.timeout(self._timeout_s):
                    reply = await evaluate(
                        self._redis,
                        self._gcra,
                        [raw_key(k) for k in keys],
                        pks,
                        cluster=self._cluster,
                        consume=False,
                        costs=costs,
                    )
            if len(reply) != REPLY_WIDTH * len(checks):
                raise RedisConnectionError(f"unexpected script reply: {reply!r:.200}")  # noqa: TRY301
        except Exception:
            if self._on_error == "deny":
                raise BackendUnavailable(self._retry_after(self._clock())) from None
            if self._fallback is not None:
                return self._fallback.peek_local(self._replicas.divided_checks(checks))
            return [unlimited(c.rate, c.cost) for c in checks]
        return [decision_of(int(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]

    def reconfigure(self, rates: Mapping[str, Rate]) -> None:
        # Redis keys carry the rate: unchanged policies keep their keys, changed ones
        # get new keys (the old ones expire by themselves).
        self._policy_keys.clear()
        self._route_keys.clear()
        self._blocked.clear()
        if self._fallback is not None:
            self._fallback.reconfigure(self._replicas.divide_all(rates))

    async def start(self) -> None:
        """Start announcing this replica and connecting; never waits on Redis."""
        if self._fallback is not None:
            await self._fallback.start()
        if self._client is not None:
            self._client.connect_soon()
        if self._announcer is None and self._announce_interval_s > 0:
            self._announcer = asyncio.get_running_loop().create_task(
                self._announce_forever(), name="ratelimit-replica-announce"
            )

    async def close(self) -> None:
        announcer, self._announcer = self._announcer, None
        if announcer is not None:
            await stop_task(announcer, retry_s=self._timeout_s)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout_s):
                    await self._replicas.run(live=False)
        self._closed = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for batch in self._queue:
            batch.cancel()
        self._queue.clear()
        self._open = None
        if self._client is not None:
            await self._client.aclose()  # batches in flight: cancelled (_complete)
        for task in list(self._tasks):  # redis-py may swallow a cancellation while connecting
            await stop_task(task, retry_s=self._timeout_s)
        if self._fallback is not None:
            await self._fallback.close()
        if self._owns_redis:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # ------------------------------------------------------------------ keys and cache

    def _policy(self, check: Check) -> PolicyKeys:
        pk = self._policy_keys.get(check.policy)
        rate = check.rate
        if pk is None or (pk.rate is not rate and pk.rate != rate):
            pk = self._policy_keys[check.policy] = PolicyKeys.of(self._prefix, check.policy, rate)
        return pk

    def _key(self, check: Check) -> bytes:
        """The check's key as a RESP bulk string (as a batch holds it)."""
        return self._policy(check).bulk_of(check.key)

    def _still_blocked(self, now: float) -> bool:
        """Whether any refusal is still running (once all have ended, the cache empties,
        and decisions take the plain path again)."""
        blocked = self._blocked
        if blocked and now >= self._blocked_until:
            blocked.clear()
        return bool(blocked)

    def _cached(self, key: bytes, now: float, cost: int) -> Decision | None:
        """The refusal of a key Redis refused, while it runs, for a request costing at
        least as much as the refused one (a cheaper one may fit what is left)."""
        entry = self._blocked.get(key)
        if entry is None:
            return None
        until, full_at, refused_cost = entry
        if now >= until:
            del self._blocked[key]
            return None
        if cost < refused_cost:
            return None
        return Decision(
            allowed=False, remaining=0, retry_after_s=until - now, reset_s=full_at - now
        )

    # ------------------------------------------------------------------ batching

    def _flush(self) -> None:
        self._flush_handle = None
        queue = self._queue
        while queue and self._inflight < self._max_inflight:
            batch = queue.popleft()
            if batch is self._open:
                self._open = None
            self._inflight += 1
            batch.sent_at = self._clock()
            if self._client is not None:
                batch.payload = pack_evalsha(
                    self._evalsha_head, batch.keys, batch.pks, b"1", batch.costs
                )
                self._client.send(batch.payload, batch)
            else:
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: Batch) -> None:
        """One batch through redis-py (Cluster)."""
        try:
            async with asyncio.timeout_at(batch.deadline):
                reply: Any = await evaluate(
                    self._redis,
                    self._gcra,
                    [raw_key(k) for k in batch.keys],
                    batch.pks,
                    cluster=self._cluster,
                    consume=True,
                    costs=batch.costs,
                )
        except asyncio.CancelledError:
            batch.cancel()
            raise
        except Exception as exc:
            reply = exc
        self._complete(batch, reply)

    def _on_reply(self, batch: Batch, reply: Any) -> None:
        """The lean connection's answer for a batch (a list, an error reply, a failure)."""
        client = self._client
        if not batch.retried and client is not None and not self._closed and is_noscript(reply):
            batch.retried = True  # load the script and call again, in one write
            client.send_many(
                self._gcra.load_command + batch.payload, (Discard(batch.deadline), batch)
            )
            return
        self._complete(batch, reply)

    def _complete(self, batch: Batch, reply: Any) -> None:
        self._inflight -= 1
        if self._closed:
            batch.cancel()
            return
        if type(reply) is list and len(reply) == REPLY_WIDTH * len(batch.keys):
            self._on_success()
            batch.settle(self._decisions(batch, reply))
        else:
            if not isinstance(reply, Exception):
                reply = RedisConnectionError(f"unexpected script reply: {reply!r:.200}")
            self._fail_batch(batch, reply)
        if self._queue and self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _decisions(self, batch: Batch, reply: list[Any]) -> list[Decision]:
        """A batch's decisions out of the script's reply (two integers a key,
        :func:`decision_of`); refusals go into the cache of refused keys."""
        decisions: list[Decision] = []
        keys = batch.keys
        blocked = self._blocked
        costs = batch.costs
        sent_at = batch.sent_at
        for i in range(0, len(reply), 2):
            decision = decision_of(reply[i], reply[i + 1])  # (ints, read as such compiled)
            if not decision.allowed:
                if len(blocked) >= self._blocked_cap:
                    blocked.clear()  # O(n) once per cap insertions: amortised O(1)
                until = sent_at + decision.retry_after_s
                refused_cost = costs[len(decisions)] if costs is not None else 1
                blocked[keys[len(decisions)]] = (until, sent_at + decision.reset_s, refused_cost)
                self._blocked_until = max(self._blocked_until, until)
            decisions.append(decision)
        return decisions

    # ------------------------------------------------------------------ replicas

    async def announce(self) -> int:
        """Announce this replica now and refresh the count of live ones (kept on error)."""
        return await self._replicas.announce()

    async def _announce_forever(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout_s * 4):
                await self._gcra.load(self._redis)
        while True:
            await self._replicas.announce()
            await asyncio.sleep(self._announce_interval_s)
