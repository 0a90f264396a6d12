"""One behaviour matrix over both limiter backends (memory with a fake clock, Redis in real
time on the machine's Redis), then what only the Redis backend has: accuracy across
replicas, Redis Cluster, batching, the over-limit cache, outages and a hanging Redis."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.batchwrite import SERVING
from gateway.config import RateLimit
from gateway.core.gcra import Decision, Rate
from gateway.metrics import Metrics
from gateway.stores import make_limiter
from gateway.stores.limiter import BackendUnavailable, Check, Limiter
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.noredis import NoRedisLimiter
from gateway.stores.redis.client import is_cluster_url, make_redis, redact_url
from gateway.stores.redis.limiter import RedisLimiter
from tests.conftest import RedisServer
from tests.gw import backend_errors

ROOT = Path(__file__).resolve().parents[2]

# T = 0.1 s: long enough for real-time Redis checks, short enough to refill quickly
FAST = Rate(10, 1.0, 5)


class FakeClock:
    def __init__(self) -> None:
        self.t = 5000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Harness:
    """A limiter and a way to let time pass (fake for memory, real for Redis)."""

    limiter: Limiter
    advance: Callable[[float], Awaitable[None]]
    real_time: bool

    async def decide(self, *checks: Check) -> list[Decision]:
        decisions = self.limiter.decide_local(checks)
        if decisions is None:
            decisions = await self.limiter.decide(checks)
        return decisions

    async def count(self, check: Check, n: int) -> int:
        return sum([(await self.decide(check))[0].allowed for _ in range(n)])


def unique_prefix() -> str:
    return f"gwtest:rl:{uuid.uuid4().hex[:12]}:"


async def delete_prefix(url: str, prefix: str) -> None:
    client = Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def shared_prefix(redis_url: str) -> AsyncIterator[str]:
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(redis_url, prefix)


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance_fake(dt: float) -> None:
            clock.t += dt

        limiter: Limiter = make_limiter(RateLimit(), None, metrics=Metrics(), clock=clock)
        yield Harness(limiter, advance_fake, real_time=False)
        return
    redis_url = request.getfixturevalue("redis_url")
    prefix = unique_prefix()
    limiter = make_limiter(
        RateLimit(backend="redis"), redis_url, metrics=Metrics(), key_prefix=prefix
    )
    await limiter.start()
    try:
        yield Harness(limiter, asyncio.sleep, real_time=True)
    finally:
        await limiter.close()
        await delete_prefix(redis_url, prefix)


def check(policy: str = "p", rate: Rate = FAST, key: str = "203.0.113.7") -> Check:
    return Check(policy, rate, key)


# ---------------------------------------------------------------- the matrix


async def test_burst_admitted_exactly_then_refused_with_retry_after(harness: Harness) -> None:
    decisions = [(await harness.decide(check()))[0] for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0, 0, 0]
    refused = decisions[5]
    assert 0.07 < refused.retry_after_s <= 0.1 + 1e-6
    assert 0.45 < refused.reset_s <= 0.5 + 1e-6
    assert all(d.retry_after_s == 0.0 for d in decisions[:5])
    assert decisions[0].reset_s == pytest.approx(0.1, abs=0.03)


async def test_refill_after_time(harness: Harness) -> None:
    assert await harness.count(check(), 7) == 5
    await harness.advance(0.15)  # one emission interval (0.1 s) and a half
    assert await harness.count(check(), 3) == 1
    await harness.advance(0.6)  # more than the whole tolerance: full again, not fuller
    assert await harness.count(check(), 8) == 5


async def test_fractional_rates(harness: Harness) -> None:
    hourly = Rate(5000, 3600.0, 3)  # one every 0.72 s
    [d] = await harness.decide(check(rate=hourly))
    assert d.remaining == 2
    assert d.reset_s == pytest.approx(0.72, abs=0.03)
    assert await harness.count(check(rate=hourly), 4) == 2
    [d] = await harness.decide(check(rate=hourly))
    assert not d.allowed
    assert 0.69 < d.retry_after_s <= 0.72 + 1e-6

    thirds = Rate(3, 1.0, 1)  # one every 0.333 s
    assert await harness.count(check("q", thirds), 3) == 1
    await harness.advance(0.2)
    assert await harness.count(check("q", thirds), 1) == 0
    await harness.advance(0.2)
    assert await harness.count(check("q", thirds), 3) == 1


async def test_several_policies_are_decided_independently(harness: Harness) -> None:
    tight, loose = check("tight", Rate(1, 60.0, 2)), check("loose", Rate(1, 60.0, 4))
    results = [await harness.decide(tight, loose) for _ in range(5)]
    assert [(a.allowed, b.allowed) for a, b in results] == [
        (True, True),
        (True, True),
        (False, True),  # refused by one policy: the other's budget is still consumed
        (False, True),
        (False, False),
    ]
    assert [b.remaining for _, b in results] == [3, 2, 1, 0, 0]
    # other keys and other policies are untouched
    [d] = await harness.decide(check("tight", Rate(1, 60.0, 2), key="198.51.100.1"))
    assert d.remaining == 1


async def test_submit_key_decides_as_submit_and_shares_its_buckets(harness: Harness) -> None:
    """A route's policies on one key through submit_key: the decisions and the buckets
    of checks through submit, also when both join one loop turn (one Redis batch), and
    after a refusal (answered from the Redis backend's cache of refused keys)."""
    tight, loose = Rate(1, 60.0, 2), Rate(1, 60.0, 4)
    policies = (("tight", tight), ("loose", loose))
    lim, ip = harness.limiter, "203.0.113.9"
    got = [await lim.submit_key(policies, ip)]
    got += await asyncio.gather(
        lim.submit_key(policies, ip),
        lim.submit([Check("tight", tight, ip), Check("loose", loose, ip)]),
    )
    got.append(await lim.submit_key(policies, ip))
    got.append(await lim.submit_key(policies, ip))
    assert [(a.allowed, b.allowed) for a, b in got] == [
        (True, True),
        (True, True),
        (False, True),
        (False, True),
        (False, False),
    ]
    assert [b.remaining for _, b in got] == [3, 2, 1, 0, 0]
    assert all(a.retry_after_s > 0 for a, _ in got[2:])
    [d] = await lim.submit_key((("tight", tight),), "198.51.100.1")
    assert d.remaining == 1
    assert await lim.submit_key((), ip) == []


async def test_peek_does_not_consume(harness: Harness) -> None:
    for _ in range(10):
        [d] = await harness.limiter.peek([check()])
        assert d.allowed
        assert d.remaining == 4
    assert await harness.count(check(), 2) == 2
    [d] = await harness.limiter.peek([check()])
    assert d.remaining == 2
    assert await harness.count(check(), 10) == 3
    [d] = await harness.limiter.peek([check()])
    assert not d.allowed
    assert 0.05 < d.retry_after_s <= 0.1 + 1e-6


async def test_reconfigure_keeps_unchanged_policies_and_drops_changed_ones(
    harness: Harness,
) -> None:
    slow = Rate(1, 60.0, 2)
    other = Rate(1, 60.0, 3)
    for name in ("same", "changed", "removed"):
        assert await harness.count(check(name, slow), 3) == 2
    harness.limiter.reconfigure({"same": Rate(1, 60.0, 2), "changed": other})
    assert await harness.count(check("same", slow), 3) == 0  # state kept
    assert await harness.count(check("changed", other), 5) == 3  # a fresh bucket
    # a new policy starts fresh
    harness.limiter.reconfigure({"same": slow, "changed": other, "new": slow})
    assert await harness.count(check("new", slow), 3) == 2
    assert await harness.count(check("same", slow), 1) == 0


async def test_decisions_come_back_in_order_under_concurrency(harness: Harness) -> None:
    keys = [f"10.0.0.{i}" for i in range(50)]
    results = await asyncio.gather(
        *[harness.decide(check(key=k), check("q", Rate(1, 60.0, 1), key=k)) for k in keys * 2]
    )
    first, second = results[:50], results[50:]
    assert all(a.allowed and b.allowed for a, b in first)
    assert all(a.allowed and not b.allowed for a, b in second)


async def test_no_checks_no_decisions(harness: Harness) -> None:
    assert await harness.limiter.decide([]) == []
    assert await harness.limiter.peek([]) == []


# ---------------------------------------------------------------- Redis specifics


def redis_limiter(url: str, prefix: str, **kwargs: Any) -> RedisLimiter:
    kwargs.setdefault("metrics", Metrics())
    rates = kwargs.pop("rates", {"p": FAST})
    return RedisLimiter(rates, redis_url=url, key_prefix=prefix, **kwargs)


async def evalsha_calls(url: str) -> int:
    client = Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_decisions_of_one_loop_turn_share_one_round_trip(private_redis: RedisServer) -> None:
    lim = redis_limiter(private_redis.url, unique_prefix(), announce_interval_s=0)
    try:
        await lim.decide([check()])  # connects and loads the script
        before = await evalsha_calls(private_redis.url)
        results = await asyncio.gather(*[lim.decide([check(key=f"k{i}")]) for i in range(200)])
        assert all(r[0].allowed for r in results)
        assert await evalsha_calls(private_redis.url) - before == 1
    finally:
        await lim.close()


async def test_a_lone_request_sends_its_script_call_at_once(private_redis: RedisServer) -> None:
    """With one request in flight there is nothing to batch with: the call leaves now,
    not at the end of the loop's round (a round less for each request at c=1); with more,
    or with none (a caller outside the proxy port's requests), it waits for the round's
    end to take the others along."""
    lim = redis_limiter(private_redis.url, unique_prefix(), announce_interval_s=0)
    try:
        await lim.decide([check()])  # connects and loads the script
        for active, sent_now in ((1, True), (2, False), (0, False)):
            saved, SERVING.active = SERVING.active, active
            try:
                answer = lim.submit([check(key=f"alone-{active}")])
                assert (lim._inflight == 1) is sent_now
                assert (len(lim._queue) == 0) is sent_now
            finally:
                SERVING.active = saved
            assert (await answer)[0].allowed
            assert lim._inflight == 0
    finally:
        await lim.close()


async def redis_calls(url: str, command: str) -> int:
    client = Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_a_key_repeated_in_one_round_trip_is_read_and_written_once(
    private_redis: RedisServer,
) -> None:
    """One client's concurrent requests share a batch: the script decides them in order
    (exactly the burst allowed, remaining counting down) with one GET and one SET per
    key, and the key's TAT and expiry are those of its last allowed request."""
    prefix = unique_prefix()
    lim = redis_limiter(private_redis.url, prefix, announce_interval_s=0)
    client = Redis.from_url(private_redis.url)
    try:
        await lim.decide([check(key="warm")])  # connects and loads the script
        await client.config_resetstat()
        sec, usec = await client.time()
        before_us = sec * 1_000_000 + usec
        results = await asyncio.gather(
            *[lim.decide([check(), check(key="other")]) for _ in range(8)]
        )
        assert await redis_calls(private_redis.url, "evalsha") == 1
        assert await redis_calls(private_redis.url, "get") == 2
        assert await redis_calls(private_redis.url, "set") == 2
        for column in (0, 1):  # each key: 5 allowed (the burst) counting down, then refused
            got = [r[column] for r in results]
            assert [d.allowed for d in got] == [True] * 5 + [False] * 3
            assert [d.remaining for d in got[:5]] == [4, 3, 2, 1, 0]
            assert all(0.0 < d.retry_after_s <= 0.1 for d in got[5:])
        key = f"{prefix}rl:{{p:203.0.113.7}}:10:1.0:5"
        raw = await client.get(key)
        assert raw is not None
        sec, usec = await client.time()
        after_us = sec * 1_000_000 + usec
        # the TAT of the fifth request: the call's time + 5 x T (the fourth's is 4 x T)
        assert before_us + 500_000 <= int(raw) <= after_us + 500_000
        assert 0 < await client.pttl(key) <= 500
    finally:
        await client.aclose()
        await lim.close()


async def test_refusals_by_key_are_answered_without_a_round_trip_and_then_forgotten(
    private_redis: RedisServer,
) -> None:
    lim = redis_limiter(private_redis.url, unique_prefix(), announce_interval_s=0)
    pairs = [(c.policy, c.rate) for c in [check()]]
    try:
        assert lim.decide_key(pairs, check().key) is None  # Redis decides
        for _ in range(6):
            await lim.submit([check()])
        before = await evalsha_calls(private_redis.url)
        assert lim.decide_key(pairs, check().key) is None  # breaker closed: submit answers
        answer = lim.submit([check()])
        assert isinstance(answer, asyncio.Future)
        assert answer.done()  # from the local cache: no round trip, no wait
        assert not answer.result()[0].allowed
        assert await evalsha_calls(private_redis.url) == before
        await asyncio.sleep(0.12)  # every refusal has ended: the cache empties
        assert (await lim.submit([check(key="other")]))[0].allowed
        assert lim._blocked == {}  # decisions take the plain path again
    finally:
        await lim.close()


async def test_an_over_limit_key_is_answered_locally(private_redis: RedisServer) -> None:
    lim = redis_limiter(private_redis.url, unique_prefix(), announce_interval_s=0)
    try:
        assert lim.decide_local([check()]) is None  # unknown: ask Redis
        for _ in range(6):
            await lim.decide([check()])
        before = await evalsha_calls(private_redis.url)
        decisions = lim.decide_local([check()])
        assert decisions is not None
        assert not decisions[0].allowed
        assert 0.0 < decisions[0].retry_after_s <= 0.1
        assert not (await lim.decide([check()]))[0].allowed
        assert await evalsha_calls(private_redis.url) == before  # no round trip
        # a mix of a blocked key and an unknown one still needs Redis
        assert lim.decide_local([check(), check(key="other")]) is None
        await asyncio.sleep(0.12)  # the retry time passed: back to Redis, which allows
        assert lim.decide_local([check()]) is None
        assert (await lim.decide([check()]))[0].allowed
    finally:
        await lim.close()


async def test_noscript_after_a_script_flush_is_recovered(private_redis: RedisServer) -> None:
    lim = redis_limiter(private_redis.url, unique_prefix(), announce_interval_s=0)
    client = Redis.from_url(private_redis.url)
    try:
        assert (await lim.decide([check()]))[0].remaining == 4
        await client.script_flush()
        assert (await lim.decide([check()]))[0].remaining == 3
        assert lim.backend_ok
    finally:
        await client.aclose()
        await lim.close()


async def test_keys_expire_when_the_bucket_is_full_again(
    redis_url: str, shared_prefix: str
) -> None:
    lim = redis_limiter(redis_url, shared_prefix, announce_interval_s=0)
    client = Redis.from_url(redis_url)
    try:
        await lim.decide([check(key="1.2.3.4")])
        keys = [k async for k in client.scan_iter(match=shared_prefix + "rl:*")]
        assert keys == [f"{shared_prefix}rl:{{p:1.2.3.4}}:10:1.0:5".encode()]
        assert 0 < await client.pttl(keys[0]) <= 100
    finally:
        await client.aclose()
        await lim.close()


WORKER = """
import asyncio, json, sys
from gateway.core.gcra import Rate
from gateway.metrics import Metrics
from gateway.stores.limiter import Check
from gateway.stores.redis.limiter import RedisLimiter

async def main(url, prefix, n):
    rate = Rate(1, 3600.0, 50)
    lim = RedisLimiter({"p": rate}, metrics=Metrics(), redis_url=url, key_prefix=prefix)
    await lim.decide([Check("warm", rate, "warm")])  # connected and ready
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    tasks = []
    for _ in range(n):  # one decision every millisecond, so that the replicas interleave
        tasks.append(asyncio.ensure_future(lim.decide([Check("p", rate, "k")])))
        await asyncio.sleep(0.001)
    results = await asyncio.gather(*tasks)
    ok = lim.backend_ok
    await lim.close()
    print(json.dumps({"allowed": sum(r[0].allowed for r in results), "ok": ok}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicas_in_separate_processes_admit_exactly_burst(redis_url: str, replicas: int) -> None:
    prefix = unique_prefix()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, prefix, "100"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        for _ in range(replicas)
    ]
    try:
        for p in procs:  # a start line: every replica is connected before any decides
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready", p.communicate(timeout=10)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=20) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        asyncio.run(delete_prefix(redis_url, prefix))
    results = [json.loads(out) for out, _ in outputs]
    assert all(r["ok"] for r in results), [err for _, err in outputs]
    assert sum(r["allowed"] for r in results) == 50
    assert sum(r["allowed"] > 0 for r in results) >= 2  # they did compete for the budget


async def test_replicas_in_one_process_with_separate_clients_admit_exactly_burst(
    redis_url: str, shared_prefix: str
) -> None:
    rate = Rate(1, 3600.0, 40)
    limiters = [redis_limiter(redis_url, shared_prefix, announce_interval_s=0) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *[lim.decide([check(rate=rate)]) for _ in range(50) for lim in limiters]
        )
        assert sum(r[0].allowed for r in results) == 40
    finally:
        for lim in limiters:
            await lim.close()


# ---------------------------------------------------------------- Redis Cluster


# the cluster_url fixture: tests/conftest.py


async def test_cluster_limits_are_exact_across_slots_and_replicas(cluster_url: str) -> None:
    prefix = unique_prefix()  # the session's Cluster is shared by the tests
    rate = Rate(1, 3600.0, 5)
    keys = [f"192.0.2.{i}" for i in range(40)]  # spread over the three masters
    limiters = [
        RedisLimiter(
            {"p": rate},
            metrics=Metrics(),
            redis_url=cluster_url,
            announce_interval_s=0,
            key_prefix=prefix,
        )
        for _ in range(2)
    ]
    try:
        results = await asyncio.gather(
            *[
                lim.decide([check(rate=rate, key=k)])
                for k in keys
                for _ in range(4)
                for lim in limiters
            ]
        )
        allowed: dict[str, int] = {}
        for k, r in zip([k for k in keys for _ in range(8)], results, strict=True):
            allowed[k] = allowed.get(k, 0) + r[0].allowed
        assert allowed == dict.fromkeys(keys, 5)
        assert all(lim.backend_ok for lim in limiters)
        # peek and a request under two policies, whose keys live on different nodes
        [d] = await limiters[0].peek([check(rate=rate, key=keys[0])])
        assert not d.allowed
        pair = await limiters[1].decide([check("a", rate, "x"), check("b", rate, "y")])
        assert [d.remaining for d in pair] == [4, 4]
    finally:
        for lim in limiters:
            await lim.close()


async def test_cluster_recovers_from_noscript(cluster_url: str) -> None:
    prefix = unique_prefix()  # the session's Cluster is shared by the tests
    rate = Rate(1, 3600.0, 3)
    metrics = Metrics()
    lim = RedisLimiter(
        {"p": rate},
        metrics=metrics,
        redis_url=cluster_url,
        announce_interval_s=0,
        key_prefix=prefix,
    )
    client = make_redis(cluster_url)
    try:
        keys = [f"noscript-{i}" for i in range(10)]
        first = await asyncio.gather(*[lim.decide([check(rate=rate, key=k)]) for k in keys])
        await client.script_flush()  # on every primary
        assert await client.script_exists(lim._gcra.sha) == [False]
        second = await asyncio.gather(*[lim.decide([check(rate=rate, key=k)]) for k in keys])
        assert [r[0].remaining for r in first] == [2] * 10
        assert [r[0].remaining for r in second] == [1] * 10
        assert lim.backend_ok
        assert backend_errors(metrics) == 0
        assert await client.script_exists(lim._gcra.sha) == [True]
    finally:
        await client.aclose()
        await lim.close()


# ---------------------------------------------------------------- outages


async def test_outage_falls_back_locally_and_shared_limiting_resumes(
    private_redis: RedisServer,
) -> None:
    metrics = Metrics()
    lim = redis_limiter(
        private_redis.url,
        unique_prefix(),
        metrics=metrics,
        rates={"p": FAST},
        breaker_failures=2,
        breaker_open_s=0.5,
        announce_interval_s=0,
    )
    h = Harness(lim, asyncio.sleep, real_time=True)
    slow = Rate(1, 3600.0, 4)
    with capture_logs() as logs:
        try:
            assert await h.count(check(rate=slow), 2) == 2
            assert lim.backend_ok
            private_redis.stop()
            # mid-traffic: no exception, the local fallback keeps limiting
            allowed = await h.count(check(rate=slow, key="fresh"), 8)
            assert allowed == 4
            assert not lim.backend_ok
            assert backend_errors(metrics) == 8
            # the breaker is open: answers come synchronously, without a round trip
            local = lim.decide_local([check(rate=slow, key="fresh")])
            assert local is not None
            assert not local[0].allowed
            private_redis.start()  # same port
            deadline = time.monotonic() + 5
            while not lim.backend_ok and time.monotonic() < deadline:
                await h.decide(check(rate=slow, key="probe"))
                await asyncio.sleep(0.05)
            assert lim.backend_ok
            errors = backend_errors(metrics)
            # shared limiting resumes: Redis holds the state again (it restarted empty)
            assert await h.count(check(rate=slow, key="shared"), 6) == 4
            other = redis_limiter(private_redis.url, lim._prefix, announce_interval_s=0)
            try:
                assert (await other.decide([check(rate=slow, key="shared")]))[0].allowed is False
            finally:
                await other.close()
            assert backend_errors(metrics) == errors
        finally:
            await lim.close()
    events = [e["event"] for e in logs]
    assert events.count("redis_unavailable") == 1
    assert events.count("redis_recovered") == 1
    assert events.index("redis_unavailable") < events.index("redis_recovered")


async def test_a_failed_batch_answers_each_caller_from_the_fallback_with_its_own_checks(
    private_redis: RedisServer,
) -> None:
    """One batch of both kinds of calls (a route's policies on one key, with a cost; a
    list of checks): when Redis fails, each caller gets the local fallback's decisions
    for its own policies, key and cost, in its order."""
    metrics = Metrics()
    two, one = Rate(2, 60.0, 2), Rate(1, 60.0, 1)
    lim = redis_limiter(
        private_redis.url,
        unique_prefix(),
        metrics=metrics,
        rates={"two": two, "one": one},
        breaker_failures=10,  # every round below goes to Redis (and fails)
        announce_interval_s=0,
    )
    route = [("two", two), ("one", one)]
    try:
        assert (await lim.submit_key(route, "warm"))[0].allowed  # connected, script loaded
        private_redis.stop()

        async def round_() -> list[list[bool]]:
            calls = [
                lim.submit_key(route, "k1"),
                lim.submit([check("one", one, "k2")]),
                lim.submit_key([("two", two)], "k3", cost=2),
            ]
            return [[d.allowed for d in await c] for c in calls]

        assert await round_() == [[True, True], [True], [True]]
        assert backend_errors(metrics) == 4
        # the fallback spent each caller's own budget: "one" is spent for k1 and k2,
        # k3's cost of 2 emptied "two" for k3, and k1 has one of "two" left
        assert await round_() == [[True, False], [False], [False]]
        assert backend_errors(metrics) == 8
    finally:
        await lim.close()


async def test_deny_raises_backend_unavailable(private_redis: RedisServer) -> None:
    metrics = Metrics()
    lim = redis_limiter(
        private_redis.url,
        unique_prefix(),
        metrics=metrics,
        on_backend_error="deny",
        breaker_failures=1,
        breaker_open_s=5.0,
        announce_interval_s=0,
    )
    try:
        assert (await lim.decide([check()]))[0].allowed
        private_redis.stop()
        with pytest.raises(BackendUnavailable) as first:
            await lim.decide([check()])
        assert first.value.retry_after_s >= 1.0
        # breaker open: no local answer (decide() must raise), and raising needs no I/O
        assert lim.decide_local([check()]) is None
        started = time.monotonic()
        with pytest.raises(BackendUnavailable) as second:
            await lim.decide([check(), check(key="b")])
        assert time.monotonic() - started < 0.05
        assert 1.0 <= second.value.retry_after_s <= 5.0
        with pytest.raises(BackendUnavailable):
            await lim.peek([check()])
        assert backend_errors(metrics) == 3
    finally:
        await lim.close()


async def test_allow_mode_allows_while_redis_is_down(private_redis: RedisServer) -> None:
    metrics = Metrics()
    lim = redis_limiter(
        private_redis.url,
        unique_prefix(),
        metrics=metrics,
        on_backend_error="allow",
        announce_interval_s=0,
    )
    try:
        private_redis.stop()
        results = [await lim.decide([check()]) for _ in range(10)]
        assert all(r[0].allowed for r in results)
        assert backend_errors(metrics) == 10
    finally:
        await lim.close()


async def test_local_fallback_divides_the_rate_by_live_replicas(
    private_redis: RedisServer,
) -> None:
    prefix = unique_prefix()
    rate = Rate(1, 3600.0, 10)
    a = redis_limiter(private_redis.url, prefix, rates={"p": rate}, breaker_failures=1)
    b = redis_limiter(private_redis.url, prefix, rates={"p": rate}, breaker_failures=1)
    try:
        assert await a.announce() == 1
        assert await b.announce() == 2
        assert await a.announce() == 2
        private_redis.stop()
        assert await a.announce() == 2  # the last count seen stays in force
        h = Harness(a, asyncio.sleep, real_time=True)
        assert await h.count(check(rate=rate, key="k"), 10) == 5  # 10 / 2 replicas
    finally:
        await a.close()
        await b.close()


async def test_replicas_that_close_withdraw_and_silent_ones_expire(
    private_redis: RedisServer,
) -> None:
    prefix = unique_prefix()
    a = redis_limiter(private_redis.url, prefix, announce_interval_s=0.05, replica_ttl_s=0.3)
    b = redis_limiter(private_redis.url, prefix, announce_interval_s=0.05, replica_ttl_s=0.3)
    c = redis_limiter(private_redis.url, prefix, announce_interval_s=0, replica_ttl_s=0.3)
    try:
        await a.start()  # announces in the background, every 50 ms
        await b.start()
        deadline = time.monotonic() + 2
        while await c.announce() != 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await c.announce() == 3
        assert a.replicas == 3 or await a.announce() == 3
        await b.close()  # withdraws at once
        assert await a.announce() == 2
        await asyncio.sleep(0.4)  # c never announces again: it expires
        assert await a.announce() == 1
    finally:
        for lim in (a, b, c):
            await lim.close()


class SilentServer:
    """Accepts TCP connections and never answers (a hung Redis)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.conns.append(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


async def test_a_hanging_redis_does_not_hang_requests(silent_server: SilentServer) -> None:
    metrics = Metrics()
    lim = RedisLimiter(
        {"p": FAST},
        metrics=metrics,
        redis_url=f"redis://127.0.0.1:{silent_server.port}/0",
        announce_interval_s=0,
        breaker_failures=1,
    )
    try:
        started = time.monotonic()
        results = await asyncio.gather(*[lim.decide([check(key=f"k{i}")]) for i in range(20)])
        assert time.monotonic() - started < 0.35
        assert all(r[0].allowed for r in results)  # the local fallback answered
        assert backend_errors(metrics) == 20
        # the breaker is open now: answers are synchronous
        started = time.monotonic()
        assert lim.decide_local([check()]) is not None
        assert (await lim.decide([check()]))[0].allowed
        assert time.monotonic() - started < 0.01
        started = time.monotonic()
        [d] = await lim.peek([check()])
        assert d.allowed
        assert time.monotonic() - started < 0.01  # peek skips Redis while the breaker is open
    finally:
        await lim.close()


async def test_redis_down_at_start_still_serves(private_redis: RedisServer) -> None:
    private_redis.stop()
    lim = redis_limiter(private_redis.url, unique_prefix(), announce_interval_s=0.05)
    try:
        started = time.monotonic()
        await lim.start()
        assert time.monotonic() - started < 0.05
        h = Harness(lim, asyncio.sleep, real_time=True)
        assert await h.count(check(), 7) == 5
    finally:
        await lim.close()


# ---------------------------------------------------------------- clients and factory


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://127.0.0.1:6379/0", False),
        ("rediss://h:6380", False),
        ("redis+cluster://127.0.0.1:7000", True),
        ("rediss+cluster://h:7000", True),
        ("redis://127.0.0.1:7000?cluster=true", True),
        ("redis://127.0.0.1:7000?cluster=no", False),
    ],
)
def test_cluster_url_forms(url: str, cluster: bool) -> None:
    assert is_cluster_url(url) is cluster


def test_unknown_url_scheme_is_an_error() -> None:
    with pytest.raises(ValueError, match="scheme"):
        make_redis("http://127.0.0.1:6379")


def test_redact_url_hides_the_password() -> None:
    assert redact_url("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert "s3cret" not in redact_url("redis://:s3cret@h:6379")
    assert redact_url("redis://h:6379") == "redis://h:6379"


async def test_factory_builds_each_backend(redis_url: str) -> None:
    metrics = Metrics()
    memory = make_limiter(RateLimit(), None, metrics=metrics)
    assert isinstance(memory, MemoryLimiter)
    client = make_redis(redis_url)
    try:
        shared = make_limiter(RateLimit(backend="redis"), None, metrics=metrics, redis=client)
        assert isinstance(shared, RedisLimiter)
        await shared.close()
        assert await client.ping()  # a client passed in is not closed by the limiter
    finally:
        await client.aclose()
    # no URL: the config loader warned; every decision is a backend error
    unset = make_limiter(RateLimit(backend="redis"), None, metrics=metrics)
    assert isinstance(unset, NoRedisLimiter)
    assert not unset.backend_ok
    before = backend_errors(metrics)
    assert (await unset.decide([check()]))[0].allowed  # on_backend_error: local (default)
    await unset.peek([check()])  # an explain is not a decision
    assert backend_errors(metrics) == before + 1
