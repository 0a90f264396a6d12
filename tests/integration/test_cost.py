"""A route's ``cost`` (SPEC 11): each request takes ``cost`` units from each of its
policies, on both backends and across replicas; ``RateLimit`` ``r=`` counts in those
units; a refused request takes nothing, and one that costs more than is left is refused."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from gateway.core.gcra import Rate
from gateway.metrics import Metrics
from gateway.stores.limiter import Check
from gateway.stores.redis.limiter import RedisLimiter
from tests.gw import base_config, running_gateway, running_replicas, url
from tests.integration import test_limiter_backends as backends
from tests.integration.test_limiter_backends import Harness, delete_prefix, unique_prefix

# the backends' fixture (memory with a fake clock, Redis); Cluster: tests/conftest.py
harness = backends.harness

pytestmark = pytest.mark.timeout(90)

SLOW = Rate(1, 3600.0, 5)  # nothing refills within a test


async def test_cost_takes_units_and_a_refusal_takes_nothing(harness: Harness) -> None:
    two = Check("p", SLOW, "203.0.113.9", 2)
    one = Check("p", SLOW, "203.0.113.9")
    decisions = [(await harness.decide(two))[0] for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert [d.remaining for d in decisions[:2]] == [3, 1]
    # the refused request of cost 2 took nothing: one unit is left for a request of cost 1
    [d] = await harness.decide(one)
    assert d.allowed
    assert d.remaining == 0
    [d] = await harness.decide(one)
    assert not d.allowed


async def test_a_cost_above_the_burst_never_passes(harness: Harness) -> None:
    [d] = await harness.decide(Check("p", SLOW, "203.0.113.10", 6))
    assert not d.allowed
    [d] = await harness.decide(Check("p", SLOW, "203.0.113.10", 5))
    assert d.allowed
    assert d.remaining == 0


async def test_submit_key_takes_the_cost_from_each_policy(harness: Harness) -> None:
    policies = (("a", SLOW), ("b", Rate(1, 3600.0, 9)))
    limiter = harness.limiter
    found = limiter.decide_key(policies, "198.51.100.1", 4)
    if found is None:
        found = await limiter.submit_key(policies, "198.51.100.1", 4)
    assert [(d.allowed, d.remaining) for d in found] == [(True, 1), (True, 5)]
    found = limiter.decide_key(policies, "198.51.100.1", 4)
    if found is None:
        found = await limiter.submit_key(policies, "198.51.100.1", 4)
    assert [(d.allowed, d.remaining) for d in found] == [(False, 0), (True, 1)]


async def test_a_cheaper_request_is_not_refused_by_the_cache_of_a_dearer_one(
    redis_url: str,
) -> None:
    prefix = unique_prefix()
    limiter = RedisLimiter({"p": SLOW}, metrics=Metrics(), redis_url=redis_url, key_prefix=prefix)
    try:
        assert (await limiter.decide([Check("p", SLOW, "k", 4)]))[0].allowed
        assert not (await limiter.decide([Check("p", SLOW, "k", 4)]))[0].allowed
        # the refusal of cost 4 is cached; a request of cost 1 still fits and is asked
        assert limiter.decide_local([Check("p", SLOW, "k", 1)]) is None
        assert (await limiter.decide([Check("p", SLOW, "k", 1)]))[0].allowed
        # one of cost 4 again is answered from the cache
        cached = limiter.decide_local([Check("p", SLOW, "k", 4)])
        assert cached is not None
        assert not cached[0].allowed
    finally:
        await limiter.close()
        await delete_prefix(redis_url, prefix)


async def test_costs_in_one_batch_and_peek(redis_url: str) -> None:
    prefix = unique_prefix()
    limiter = RedisLimiter({"p": SLOW}, metrics=Metrics(), redis_url=redis_url, key_prefix=prefix)
    try:
        # one round trip holding a cost-1 key and a cost-3 key, and the same key twice
        results = await asyncio.gather(
            limiter.decide([Check("p", SLOW, "a")]),
            limiter.decide([Check("p", SLOW, "b", 3)]),
            limiter.decide([Check("p", SLOW, "b", 3)]),
            limiter.submit_key((("p", SLOW),), "c", 2),
        )
        assert [(r[0].allowed, r[0].remaining) for r in results] == [
            (True, 4),
            (True, 2),
            (False, 0),
            (True, 3),
        ]
        [d] = await limiter.peek([Check("p", SLOW, "b", 2)])
        assert d.allowed
        assert d.remaining == 0
        [d] = await limiter.peek([Check("p", SLOW, "b", 3)])
        assert not d.allowed
    finally:
        await limiter.close()
        await delete_prefix(redis_url, prefix)


async def test_cluster_costs_are_exact_across_replicas(cluster_url: str) -> None:
    prefix = unique_prefix()  # the session's Cluster is shared by the tests
    limiters = [
        # a generous timeout: a loaded machine must not turn this into the local fallback
        RedisLimiter(
            {"p": SLOW},
            metrics=Metrics(),
            redis_url=cluster_url,
            announce_interval_s=0,
            timeout_s=5.0,
            key_prefix=prefix,
        )
        for _ in range(2)
    ]
    keys = [f"192.0.2.{i}" for i in range(12)]
    try:
        results = await asyncio.gather(
            *[
                lim.decide([Check("p", SLOW, k, 2)])
                for k in keys
                for lim in limiters
                for _ in range(2)
            ]
        )
        allowed: dict[str, int] = {}
        for k, r in zip([k for k in keys for _ in range(4)], results, strict=True):
            allowed[k] = allowed.get(k, 0) + r[0].allowed
        assert all(lim.backend_ok for lim in limiters)
        assert allowed == dict.fromkeys(keys, 2)  # 2 x 2 units of 5
        # a daily quota of 5 on the same nodes: 2 x 2 units, then 1 of cost 1
        daily = Rate.quota(5, "day")
        results = await asyncio.gather(
            *[
                lim.decide([Check("d", daily, k, 2)])
                for k in keys
                for lim in limiters
                for _ in range(2)
            ]
        )
        assert sum(r[0].allowed for r in results) == 2 * len(keys)
        ones = await asyncio.gather(
            *[lim.decide([Check("d", daily, k)]) for k in keys for lim in limiters]
        )
        assert sum(r[0].allowed for r in ones) == len(keys)
        assert all(0 < r[0].reset_s <= 86400 for r in ones)
        assert all(lim.backend_ok for lim in limiters)
    finally:
        for lim in limiters:
            await lim.close()


# ---------------------------------------------------------------- over sockets


def _cfg(upstream: str, policy: str, **extra: object) -> dict[str, object]:
    return base_config(
        upstream,
        rate_limit={"policies": {policy: {"requests": 1, "period_s": 3600, "burst": 12}}, **extra},
        routes=[
            {
                "name": "search",
                "path_prefix": "/search",
                "upstream": "api",
                "rate_limits": [policy],
                "cost": 5,
            },
            {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": [policy]},
        ],
        abuse={"enabled": False},
    )


async def test_ratelimit_counts_in_units_over_sockets(upstream: str) -> None:
    async with running_gateway(_cfg(upstream, "quota")) as gw, aiohttp.ClientSession() as s:
        seen = []
        for _ in range(3):
            async with s.get(url(gw, "/search")) as r:
                seen.append((r.status, r.headers.get("RateLimit", "")))
        assert [st for st, _ in seen] == [200, 200, 429]
        assert seen[0][1].startswith('"quota";r=7;')
        assert seen[1][1].startswith('"quota";r=2;')
        assert seen[2][1].startswith('"quota";r=0;')
        # the refused request of cost 5 took nothing: two of cost 1 still pass
        for left in (1, 0):
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 200
                assert r.headers["RateLimit"].startswith(f'"quota";r={left};')
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 429


async def test_two_gateways_on_redis_spend_costs_exactly(upstream: str, redis_url: str) -> None:
    policy = f"cost-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(upstream, policy, backend="redis")
    env = {"GATEWAY_REDIS_URL": redis_url}
    async with running_replicas(cfg, env) as (a, b), aiohttp.ClientSession() as s:

        async def hit(i: int, path: str) -> int:
            async with s.get(url((a, b)[i % 2], path)) as r:
                return r.status

        statuses = await asyncio.gather(*(hit(i, "/search") for i in range(10)))
        assert statuses.count(200) == 2  # 2 x 5 of 12
        statuses = await asyncio.gather(*(hit(i, "/x") for i in range(6)))
        assert statuses.count(200) == 2
