"""Gateway replicas sharing one Redis: limits and bans hold across them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from tests.gw import base_config, running_gateway, url

pytestmark = pytest.mark.timeout(60)


def _fresh_ip(first: int) -> str:
    n = uuid.uuid4().int
    return f"{first}.{n >> 16 & 255}.{n >> 8 & 255}.{n % 250 + 1}"


def _cfg(upstream: str, policy: str) -> dict[str, Any]:
    return base_config(
        upstream,
        trusted_proxies=["127.0.0.1/32"],
        rate_limit={
            "backend": "redis",
            "policies": {policy: {"requests": 1, "period_s": 60, "burst": 10}},
        },
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": [policy]}],
    )


async def test_three_replicas_admit_exactly_burst_and_share_bans(
    redis_url: str, upstream: str
) -> None:
    policy = f"p-{uuid.uuid4().hex[:8]}"  # a fresh key space for this run
    # addresses no other test reports (bans outlive a test in the shared Redis)
    client = _fresh_ip(10)
    env = {"GATEWAY_REDIS_URL": redis_url}
    async with (
        running_gateway(_cfg(upstream, policy), env) as a,
        running_gateway(_cfg(upstream, policy), env) as b,
        running_gateway(_cfg(upstream, policy), env) as c,
        aiohttp.ClientSession() as s,
    ):

        async def hit(gw: Any) -> int:
            async with s.get(url(gw, "/x"), headers={"X-Forwarded-For": client}) as r:
                return r.status

        replicas = (a, b, c)
        statuses = await asyncio.gather(*(hit(replicas[i % 3]) for i in range(45)))
        assert statuses.count(200) == 10  # the burst, exactly, across all three
        assert statuses.count(429) == 35

        scanner = _fresh_ip(11)
        for _ in range(2):
            async with s.get(url(a, "/.env"), headers={"X-Forwarded-For": scanner}) as r:
                pass
        # The score is kept in Redis: the ban is known once the script's reply is in.
        deadline = asyncio.get_running_loop().time() + 2.0
        while a.runtime.bans.banned(scanner) is None:
            assert asyncio.get_running_loop().time() < deadline, "no ban within 2 s"
            await asyncio.sleep(0.02)
        deadline = asyncio.get_running_loop().time() + 1.0
        while b.runtime.bans.banned(scanner) is None:
            assert asyncio.get_running_loop().time() < deadline, "ban not shared within 1 s"
            await asyncio.sleep(0.05)
        async with s.get(url(b, "/x"), headers={"X-Forwarded-For": scanner}) as r:
            assert r.status == 403
        await a.runtime.bans.unban(scanner)

    # a restarted replica still sees a ban made before
    async with running_gateway(_cfg(upstream, policy), env) as c:
        other = _fresh_ip(12)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(url(c, "/.env"), headers={"X-Forwarded-For": other}) as r:
                    pass
    async with running_gateway(_cfg(upstream, policy), env) as d:
        deadline = asyncio.get_running_loop().time() + 1.0
        while d.runtime.bans.banned(other) is None:
            assert asyncio.get_running_loop().time() < deadline, "ban lost across a restart"
            await asyncio.sleep(0.05)
        async with (
            aiohttp.ClientSession() as s,
            s.get(url(d, "/x"), headers={"X-Forwarded-For": other}) as r,
        ):
            assert r.status == 403
        await d.runtime.bans.unban(other)
