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
    Decisions requested in the same event-loop turn share one round trip: they join
    one batch, and a callback scheduled with ``call_soon`` sends it as one script call
    over all its keys (standalone), or one pipeline of script calls, one per hash slot
    (Cluster; redis-py splits the pipeline per node).  Up to ``max_inflight_batches``
    round trips run at once (``max_batch`` checks each); beyond that, decisions wait
    for the next one and batches grow by themselves.

Connections
    Standalone Redis (``redis://``, ``rediss://``, ``unix://``) is reached for
    decisions through :mod:`gateway.stores.redis.resp`: one pipelined connection of the
    limiter's own, commands packed by hand, replies parsed by hiredis, no task,
    context manager or pool per round trip (a batch is written, and its reply handled,
    in callbacks).  Redis Cluster, and clients whose settings that connection does not
    speak (Sentinel pools, credential providers), go through redis-py.  Replica
    announcements always use redis-py (the client passed in, or one made from the
    URL): they are not on the request path.  Measured (``bench/bench_limiter.py
    --concurrency 50 --spread 10 --work-us 100 --policies 2 --uvloop``, the pattern of a
    saturated gateway, about 7 requests per round trip): the Redis backend costs about
    4 µs of this process's CPU per request more than the memory backend, against about
    25 µs through redis-py; one request at a time, a decision takes about 28 µs
    (p50) against about 95 µs.

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
    A round trip is bounded by ``timeout_s`` (250 ms) from the moment the first
    decision of its batch was queued, whatever Redis does (on the lean connection, a
    round trip past its deadline drops the connection, failing every round trip still
    on it; the next one reconnects: a stuck or half-open connection is not reused).
    After ``breaker_failures`` failed round trips in a
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
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from importlib import resources
from typing import Any, Literal, NamedTuple

from redis.asyncio import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.core.gcra import Decision, Rate
from gateway.logs import get_logger
from gateway.metrics import Metrics
from gateway.stores.limiter import (
    BackendUnavailable,
    Check,
    Clock,
    Limiter,
    bounded_key,
    unlimited,
)
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.redis.client import make_redis
from gateway.stores.redis.resp import (
    Endpoint,
    FutureWaiter,
    RespClient,
    Waiter,
    bulk_string,
    pack_command,
)
from gateway.tasks import stop_task

__all__ = ["RedisLimiter", "load_script"]

OnBackendError = Literal["local", "allow", "deny"]
_tuple_new = tuple.__new__


def load_script(name: str) -> str:
    return resources.files("gateway.stores.redis").joinpath("lua", name).read_text("utf-8")


class _PolicyKeys:
    """What a policy's checks share: its key's head and tail, its rate as script args."""

    __slots__ = ("head", "params", "rate", "rate_args", "tail")

    def __init__(self, rate: Rate, head: bytes, tail: bytes, params: tuple[int, int]) -> None:
        self.rate = rate
        self.head = head
        self.tail = tail
        self.params = params  # emission interval in microseconds, burst
        self.rate_args = bulk_string(params[0]) + bulk_string(params[1])


class _Part(NamedTuple):
    """One decide() call in a batch: its checks are ``size`` from ``start`` on."""

    future: asyncio.Future[list[Decision]]
    start: int
    size: int
    cached: list[Decision | None] | None  # answers known locally, None where Redis answers

    def answer(self, decisions: list[Decision]) -> list[Decision]:
        """This call's decisions out of the batch's."""
        if self.cached is None:
            return decisions[self.start : self.start + self.size]
        answers = iter(decisions[self.start :])
        return [d if d is not None else next(answers) for d in self.cached]


class _Batch(Waiter):
    """Checks of one loop turn sharing a round trip; one future per decide() call."""

    __slots__ = ("checks", "keys", "limiter", "parts", "payload", "pks", "retried", "sent_at")

    def __init__(self, limiter: RedisLimiter, deadline: float) -> None:
        self.deadline = deadline  # loop time: first queued + timeout_s
        self.limiter = limiter
        self.parts: list[_Part] = []
        self.checks: list[Check] = []
        self.keys: list[bytes] = []
        self.pks: list[_PolicyKeys] = []
        self.sent_at = 0.0  # limiter clock
        self.payload = b""
        self.retried = False

    def resolve(self, reply: Any) -> None:
        self.limiter._on_reply(self, reply)

    def settle(self, decisions: list[Decision]) -> None:
        for part in self.parts:
            if not part.future.done():
                part.future.set_result(part.answer(decisions))

    def cancel(self) -> None:
        for part in self.parts:
            part.future.cancel()


class _Discard(Waiter):
    """A reply nobody needs (SCRIPT LOAD ahead of a retried call: the call tells)."""

    __slots__ = ()

    def resolve(self, reply: Any) -> None:
        pass


class _Script:
    """A Lua script called by SHA, loaded again after NOSCRIPT."""

    def __init__(self, name: str) -> None:
        self.source = load_script(name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        self.load_command = pack_command("SCRIPT", "LOAD", self.source)

    async def load(self, redis: Any) -> None:
        await redis.script_load(self.source)


def _is_noscript(exc: object) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT")


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
        self._evalsha_head = b"$7\r\nEVALSHA\r\n" + bulk_string(self._gcra.sha)
        self._announce_script = _Script("replicas.lua")
        self._policy_keys: dict[str, _PolicyKeys] = {}
        # id(a route's policies) -> (those policies, their key parts), for submit_key
        self._route_keys: dict[int, tuple[Sequence[tuple[str, Rate]], list[_PolicyKeys]]] = {}
        # key -> (refused until, full again at), on the limiter clock
        self._blocked: dict[bytes, tuple[float, float]] = {}
        self._blocked_until = 0.0  # when the last refusal in the cache ends

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

        self._queue: deque[_Batch] = deque()  # batches not sent yet, oldest first
        self._open: _Batch | None = None  # the batch new checks join (the newest queued)
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
        return self._replicas

    def decide_key(self, policies: Sequence[tuple[str, Rate]], key: str) -> list[Decision] | None:
        # Refused keys are answered by submit() from the local cache, with a finished
        # future (no round trip, no wait): here only the open breaker's fallback.
        if not self._open_until:
            return None
        return super().decide_key(policies, key)

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
            decision = self._cached(self._key(check), now)
            if decision is None:
                return None
            out.append(decision)
        return out

    async def decide(self, checks: Sequence[Check]) -> list[Decision]:
        return await self.submit(checks)

    def submit_key(
        self, policies: Sequence[tuple[str, Rate]], key: str
    ) -> Awaitable[list[Decision]]:
        """:meth:`submit` for a route's policies on one key (the client's address): no
        Check built by the caller, the key encoded once, the policies' key parts cached
        per route."""
        loop = self._loop
        if self._open_until or self._blocked or loop is None or loop.is_closed() or not policies:
            return self.submit([_tuple_new(Check, (name, rate, key)) for name, rate in policies])
        entry = self._route_keys.get(id(policies))
        if entry is None or entry[0] is not policies:
            entry = self._route_entry(policies)
        future: asyncio.Future[list[Decision]] = loop.create_future()
        batch = self._batch(loop)
        start = len(batch.keys)
        raw = bounded_key(key).encode("utf-8", "surrogatepass")
        add_check, add_key = batch.checks.append, batch.keys.append
        for policy, pk in zip(policies, entry[1], strict=True):
            add_check(_tuple_new(Check, (policy[0], policy[1], key)))
            add_key(pk.head + raw + pk.tail)
        batch.pks += entry[1]
        if len(batch.keys) >= self._max_batch:
            self._open = None  # full: the next decision starts another batch
        batch.parts.append(_tuple_new(_Part, (future, start, len(policies), None)))
        return future

    def _route_entry(
        self, policies: Sequence[tuple[str, Rate]]
    ) -> tuple[Sequence[tuple[str, Rate]], list[_PolicyKeys]]:
        cache = self._route_keys
        if len(cache) >= 256:
            cache.clear()  # routes of many reloads ago
        entry = (policies, [self._policy(Check(name, rate, "")) for name, rate in policies])
        cache[id(policies)] = entry  # the entry holds the policies: their id is not reused
        return entry

    def _batch(self, loop: asyncio.AbstractEventLoop) -> _Batch:
        """The batch new checks join; a new one, queued, when there is none open."""
        batch = self._open
        if batch is None:
            batch = self._open = _Batch(self, loop.time() + self._timeout_s)
            self._queue.append(batch)
            if self._flush_handle is None:
                self._flush_handle = loop.call_soon(self._flush)
        return batch

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
                cached = [self._cached(key, now) for key in keys]
                if all(d is not None for d in cached):
                    self._probing = False
                    future.set_result(cached)  # type: ignore[arg-type]
                    return future
        batch = self._batch(loop)
        start = len(batch.keys)
        if cached is None:
            batch.checks += checks
            add_key, add_pk = batch.keys.append, batch.pks.append
            last, raw = None, b""
            for check in checks:
                pk = self._policy(check)
                add_pk(pk)
                if check.key is not last:  # policies on the client address share its key
                    last = check.key
                    raw = bounded_key(last).encode("utf-8", "surrogatepass")
                add_key(pk.head + raw + pk.tail)
        else:
            assert keys is not None  # noqa: S101 - computed with cached
            for check, key, decision in zip(checks, keys, cached, strict=True):
                if decision is None:
                    batch.checks.append(check)
                    batch.keys.append(key)
                    batch.pks.append(self._policy(check))
        if len(batch.keys) >= self._max_batch:
            self._open = None  # full: the next decision starts another batch
        batch.parts.append(_tuple_new(_Part, (future, start, len(checks), cached)))
        return future

    async def peek(self, checks: Sequence[Check]) -> list[Decision]:
        """Ask Redis without consuming (not batched, not cached: for /admin/explain)."""
        if not checks:
            return []
        try:
            if self._open_until and self._clock() < self._open_until:
                raise ConnectionError("circuit open")  # noqa: TRY301 - one fallback path
            keys = [self._key(c) for c in checks]
            pks = [self._policy(c) for c in checks]
            if self._client is not None:
                reply = await self._peek_lean(keys, pks)
            else:
                async with asyncio.timeout(self._timeout_s):
                    reply = await self._evaluate(keys, pks, consume=False)
            if len(reply) != 4 * len(checks):
                raise RedisConnectionError(f"unexpected script reply: {reply!r:.200}")  # noqa: TRY301
        except Exception:
            if self._on_error == "deny":
                raise BackendUnavailable(self._retry_after(self._clock())) from None
            if self._fallback is not None:
                return self._fallback.peek_local(self._divided_checks(checks))
            return [unlimited(c.rate) for c in checks]
        it = iter(reply)
        return [
            Decision(bool(allowed), int(remaining), retry_us / 1e6, reset_us / 1e6)
            for allowed, remaining, retry_us, reset_us in zip(it, it, it, it, strict=True)
        ]

    def reconfigure(self, rates: Mapping[str, Rate]) -> None:
        # Redis keys carry the rate: unchanged policies keep their keys, changed ones
        # get new keys (the old ones expire by themselves).
        self._policy_keys.clear()
        self._route_keys.clear()
        self._blocked.clear()
        if self._fallback is not None:
            self._fallback.reconfigure(self._divide_all(rates))

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
                    await self._run_announce(live=False)
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

    def _still_blocked(self, now: float) -> bool:
        """Whether any refusal is still running (once all have ended, the cache empties,
        and decisions take the plain path again)."""
        blocked = self._blocked
        if blocked and now >= self._blocked_until:
            blocked.clear()
        return bool(blocked)

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
        queue = self._queue
        while queue and self._inflight < self._max_inflight:
            batch = queue.popleft()
            if batch is self._open:
                self._open = None
            self._inflight += 1
            batch.sent_at = self._clock()
            if self._client is not None:
                batch.payload = self._pack(batch.keys, batch.pks, b"1")
                self._client.send(batch.payload, batch)
            else:
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: _Batch) -> None:
        """One batch through redis-py (Cluster)."""
        try:
            async with asyncio.timeout_at(batch.deadline):
                reply: Any = await self._evaluate(batch.keys, batch.pks, consume=True)
        except asyncio.CancelledError:
            batch.cancel()
            raise
        except Exception as exc:
            reply = exc
        self._complete(batch, reply)

    def _on_reply(self, batch: _Batch, reply: Any) -> None:
        """The lean connection's answer for a batch (a list, an error reply, a failure)."""
        client = self._client
        if not batch.retried and client is not None and not self._closed and _is_noscript(reply):
            batch.retried = True  # load the script and call again, in one write
            client.send_many(
                self._gcra.load_command + batch.payload, (_Discard(batch.deadline), batch)
            )
            return
        self._complete(batch, reply)

    def _complete(self, batch: _Batch, reply: Any) -> None:
        self._inflight -= 1
        if self._closed:
            batch.cancel()
            return
        keys = batch.keys
        if type(reply) is list and len(reply) == 4 * len(keys):
            self._on_success()
            decisions: list[Decision] = []
            append = decisions.append
            blocked = self._blocked
            sent_at = batch.sent_at
            it = iter(reply)
            for allowed, remaining, retry_us, reset_us in zip(it, it, it, it, strict=True):
                if allowed:  # a Decision without its keyword-argument __new__
                    append(_tuple_new(Decision, (True, remaining, 0.0, reset_us / 1e6)))
                    continue
                retry, reset = retry_us / 1e6, reset_us / 1e6
                if len(blocked) >= self._blocked_cap:
                    blocked.clear()  # O(n) once per cap insertions: amortised O(1)
                until = sent_at + retry
                blocked[keys[len(decisions)]] = (until, sent_at + reset)
                self._blocked_until = max(self._blocked_until, until)
                append(_tuple_new(Decision, (False, 0, retry, reset)))
            batch.settle(decisions)
        else:
            if not isinstance(reply, Exception):
                reply = RedisConnectionError(f"unexpected script reply: {reply!r:.200}")
            self._fail_batch(batch, reply)
        if self._queue and self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _fail_batch(self, batch: _Batch, exc: Exception) -> None:
        self._on_failure(exc)
        now = self._clock()
        futures = [p.future for p in batch.parts if not p.future.done()]
        if not futures:
            return
        if self._on_error == "deny":
            self._metrics.ratelimit_backend_errors.inc(len(batch.checks))
            retry_after = self._retry_after(now)
            for future in futures:
                future.set_exception(BackendUnavailable(retry_after))
            return
        batch.settle(self._fallback_decisions(batch.checks))

    def _pack(self, keys: Sequence[bytes], pks: Sequence[_PolicyKeys], flag: bytes) -> bytes:
        """``EVALSHA`` of the GCRA script over ``keys``, as RESP.

        Arguments stay few: the keys, then one string of rate indexes, then each
        distinct rate once.
        """
        rates: dict[bytes, bytes] = {}
        indexes = []
        for pk in pks:
            index = rates.get(pk.rate_args)
            if index is None:
                index = rates[pk.rate_args] = b"%d" % (len(rates) + 1)
            indexes.append(index)
        joined = b" ".join(indexes)
        n = len(keys)
        parts = [
            b"*%d\r\n%b%b" % (n + 5 + 2 * len(rates), self._evalsha_head, bulk_string(n)),
            *[b"$%d\r\n%b\r\n" % (len(key), key) for key in keys],
            b"$1\r\n%b\r\n$%d\r\n%b\r\n" % (flag, len(joined), joined),
            *rates,
        ]
        return b"".join(parts)

    async def _peek_lean(self, keys: Sequence[bytes], pks: Sequence[_PolicyKeys]) -> Any:
        """The script without consuming, over the lean connection (NOSCRIPT: load, retry)."""
        assert self._client is not None  # noqa: S101 - called only with the lean client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        payload = self._pack(keys, pks, b"0")
        future: asyncio.Future[Any] = loop.create_future()
        self._client.send(payload, FutureWaiter(deadline, future))
        try:
            return await future
        except ResponseError as exc:
            if not _is_noscript(exc):
                raise
        future = loop.create_future()
        self._client.send_many(
            self._gcra.load_command + payload,
            (_Discard(deadline), FutureWaiter(deadline, future)),
        )
        return await future

    async def _evaluate(
        self, keys: Sequence[bytes], pks: Sequence[_PolicyKeys], *, consume: bool
    ) -> list[Any]:
        """The GCRA script through redis-py: four integers per key, in order."""
        flag = "1" if consume else "0"
        if not self._cluster:
            groups = [list(range(len(keys)))]
        else:
            by_slot: dict[int, list[int]] = {}
            for i, key in enumerate(keys):
                by_slot.setdefault(key_slot(key), []).append(i)
            groups = list(by_slot.values())
        replies = await self._run_groups(keys, pks, groups, flag)
        flat: list[Any] = [0] * (4 * len(keys))
        for group, reply in zip(groups, replies, strict=True):
            if not isinstance(reply, list) or len(reply) != 4 * len(group):
                raise RedisConnectionError(f"unexpected script reply: {reply!r:.200}")
            for j, index in enumerate(group):
                flat[4 * index : 4 * index + 4] = reply[4 * j : 4 * j + 4]
        return flat

    async def _run_groups(
        self,
        keys: Sequence[bytes],
        pks: Sequence[_PolicyKeys],
        groups: list[list[int]],
        flag: str,
    ) -> list[Any]:
        """One script call per group: a single EVALSHA, or a pipeline of them."""
        sha = self._gcra.sha
        commands: list[tuple[Any, ...]] = []
        for group in groups:
            rates: dict[tuple[int, int], int] = {}
            indexes = []
            for i in group:
                params = pks[i].params
                index = rates.get(params)
                if index is None:
                    index = rates[params] = len(rates) + 1
                indexes.append(str(index))
            args: list[Any] = [sha, len(group)]
            args += [keys[i] for i in group]
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
        if self._ok and not (self._failures or self._open_until or self._probing):
            return  # the usual case, once per batch
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
        return [unlimited(c.rate) for c in checks]

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
