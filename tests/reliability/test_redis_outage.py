"""Redis killed and restarted under steady load, two gateways sharing it.

With ``on_backend_error: local`` the gateways must keep answering (no 5xx), keep
limiting (an over-limit key still gets 429s, from the local fallback at the rate
divided by the live replicas), count the failures in
``gateway_ratelimit_backend_errors_total``, and go back to the shared budget in Redis
once it returns, without a restart.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from tests.conftest import RedisServer
from tests.reliability.support import (
    GatewayProcess,
    RawUpstream,
    Tally,
    gateway_config,
    gateway_process,
    metric_sum,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

BACKEND_ERRORS = "gateway_ratelimit_backend_errors_total"
QUOTA_BURST = 10


def _config(upstream_url: str) -> dict[str, Any]:
    return gateway_config(
        upstream_url,
        routes=[
            {"name": "hot", "path_prefix": "/hot/", "upstream": "api", "rate_limits": ["hot"]},
            {
                "name": "quota",
                "path_prefix": "/quota/",
                "upstream": "api",
                "rate_limits": ["quota"],
            },
            {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["steady"]},
        ],
        rate_limit={
            "backend": "redis",
            "on_backend_error": "local",
            "policies": {
                "steady": {"requests": 1000, "period_s": 1, "key": "header:X-Client"},
                "hot": {"requests": 10, "period_s": 1, "key": "header:X-Hot"},
                "quota": {
                    "requests": 1,
                    "period_s": 600,
                    "burst": QUOTA_BURST,
                    "key": "header:X-Quota",
                },
            },
        },
        # shadow: the Redis ban store works through the outage too, blocking nobody
        abuse={"enabled": True, "mode": "shadow"},
        redis_health={"interval_s": 0.25, "timeout_s": 0.25},
    )


async def _spend(
    s: aiohttp.ClientSession, gws: list[GatewayProcess], key: str, counts: list[int]
) -> list[int]:
    """Send counts[i] requests with quota key ``key`` to gws[i]; return how many passed."""
    passed = []
    for gw, n in zip(gws, counts, strict=True):
        ok = 0
        for _ in range(n):
            async with s.get(gw.url("/quota/x"), headers={"X-Quota": key}) as r:
                await r.read()
                assert r.status in (200, 429), r.status
                ok += r.status == 200
        passed.append(ok)
    return passed


async def _backend_errors(gw: GatewayProcess) -> float:
    return metric_sum(await gw.metrics(), BACKEND_ERRORS)


async def test_redis_killed_and_restarted_under_load(
    private_redis: RedisServer, raw_upstream: RawUpstream
) -> None:
    env = {"GATEWAY_REDIS_URL": private_redis.url}
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            gateway_process(_config(raw_upstream.url), env=env, name="redis-a")
        )
        b = await stack.enter_async_context(
            gateway_process(_config(raw_upstream.url), env=env, name="redis-b")
        )
        s = await stack.enter_async_context(aiohttp.ClientSession())
        gws = [a, b]

        # shared budget before: A takes all of it, B gets nothing
        assert await _spend(s, gws, "before", [QUOTA_BURST + 2, 3]) == [QUOTA_BURST, 0]

        steady, hot = Tally(), Tally()
        hot_times: list[tuple[float, int]] = []
        stop = asyncio.Event()

        async def steady_client(i: int) -> None:
            gw = gws[i % 2]
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.get(gw.url(f"/s/{i}"), headers={"X-Client": f"c{i}"}) as r:
                        await r.read()
                        steady.add(r.status, time.monotonic() - t0)
                except aiohttp.ClientError as exc:
                    steady.error(type(exc).__name__)
                await asyncio.sleep(0.01)

        async def hot_client() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.get(a.url("/hot/x"), headers={"X-Hot": "h"}) as r:
                        await r.read()
                        hot.add(r.status, time.monotonic() - t0)
                        hot_times.append((time.monotonic(), r.status))
                except aiohttp.ClientError as exc:
                    hot.error(type(exc).__name__)
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(steady_client(i)) for i in range(10)]
        tasks.append(asyncio.create_task(hot_client()))
        try:
            await asyncio.sleep(1.0)
            errors_before = [await _backend_errors(gw) for gw in gws]

            private_redis.stop()  # SIGKILL
            down_at = time.monotonic()
            await asyncio.sleep(1.0)
            # fallback: the budget is local, divided by the live replicas last seen; B
            # started after A had announced itself, so B has seen 2 (A may still count 1
            # until its next announcement, every 5 s)
            during = await _spend(s, [b], "during", [QUOTA_BURST + 2])
            await asyncio.sleep(1.5)
            errors_down = [await _backend_errors(gw) for gw in gws]

            private_redis.start()  # same port, empty
            up_at = time.monotonic()
            # back on Redis: the error counters stop growing on both gateways
            recovered_after = None
            last = errors_down
            stable_since = None
            while time.monotonic() - up_at < 15:
                await asyncio.sleep(0.25)
                now = [await _backend_errors(gw) for gw in gws]
                if now == last:
                    stable_since = stable_since or time.monotonic()
                    if time.monotonic() - stable_since >= 1.0:
                        recovered_after = stable_since - up_at
                        break
                else:
                    stable_since = None
                last = now
            assert recovered_after is not None, "the gateways never stopped failing over"
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        after = await _spend(s, gws, "after", [QUOTA_BURST + 2, 3])
        hot_down = [st for t, st in hot_times if down_at <= t < up_at]
        report(
            "redis outage",
            steady=steady.statuses,
            steady_errors=steady.errors,
            hot=hot.statuses,
            hot_429_while_down=f"{hot_down.count(429)}/{len(hot_down)}",
            backend_errors_growth=[d - b for b, d in zip(errors_before, errors_down, strict=True)],
            quota_during=during,
            quota_after=after,
            recovered_after_s=round(recovered_after, 2),
            steady_p99_ms=round(
                sorted(steady.latencies)[int(len(steady.latencies) * 0.99)] * 1000, 1
            ),
        )

        # never a gateway error, on any route, through the whole outage
        assert steady.errors == {}
        assert hot.errors == {}
        assert steady.count(500, 599) == 0, steady.statuses
        assert hot.count(500, 599) == 0, hot.statuses
        assert steady.statuses.get(200, 0) > 500
        assert set(steady.statuses) == {200}
        # limits went on while Redis was down
        assert len(hot_down) > 50
        assert hot_down.count(429) > len(hot_down) // 2
        assert hot_down.count(200) >= 1
        # local fallback at burst / 2 replicas
        assert during == [QUOTA_BURST // 2]
        for before, down in zip(errors_before, errors_down, strict=True):
            assert down - before > 50
        # back on the shared budget: A takes all of it, B gets nothing
        assert after == [QUOTA_BURST, 0]
        assert recovered_after < 8
        for gw in gws:
            assert gw.unexpected_log_lines() == [], gw.unexpected_log_lines()[:3]
