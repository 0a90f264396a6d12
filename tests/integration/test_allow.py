"""Break-glass allow over real sockets: POST/GET/DELETE /admin/allow, one gateway and
two on one Redis (an entry made on one applies on the other within a second)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from typing import Any

import aiohttp
import pytest

from tests.conftest import free_port
from tests.gw import admin_url, base_config, running_gateway, url

pytestmark = pytest.mark.timeout(60)

TOKEN = "allow-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DENIED = "192.0.2.0/24"


def _fresh_ip(first: int) -> str:
    n = uuid.uuid4().int
    return f"{first}.{n >> 16 & 255}.{n >> 8 & 255}.{n % 250 + 1}"


def _cfg(upstream: str, backend: str, policy: str) -> dict[str, Any]:
    return base_config(
        upstream,
        admin={"host": "127.0.0.1", "port": free_port(), "token_env": "ALLOW_TOKEN"},
        trusted_proxies=["127.0.0.1/32"],
        deny_cidrs=[DENIED],
        rate_limit={
            "backend": backend,
            "policies": {policy: {"requests": 1, "period_s": 60, "burst": 2}},
        },
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": [policy]}],
    )


async def _get(s: aiohttp.ClientSession, gw: Any, client: str, path: str = "/x") -> int:
    async with s.get(url(gw, path), headers={"X-Forwarded-For": client}) as r:
        await r.read()
        return r.status


async def _allow(s: aiohttp.ClientSession, gw: Any, body: Any) -> tuple[int, Any]:
    async with s.post(admin_url(gw, "/admin/allow"), json=body, headers=AUTH) as r:
        return r.status, await r.json(content_type=None)


async def _listed(s: aiohttp.ClientSession, gw: Any) -> list[str]:
    async with s.get(admin_url(gw, "/admin/allow"), headers=AUTH) as r:
        assert r.status == 200
        return [e["ip"] for e in (await r.json())["allow"]]


async def _ban(s: aiohttp.ClientSession, gw: Any, client: str) -> None:
    for _ in range(2):
        await _get(s, gw, client, "/.env")
    deadline = time.monotonic() + 2
    while gw.runtime.bans.banned(client) is None:
        assert time.monotonic() < deadline, "no ban"
        await asyncio.sleep(0.02)


async def _until(check: Any, within: float) -> float:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, f"not within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _metric(gw: Any, name: str, **labels: str) -> float:
    return gw.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_allow_on_one_gateway(upstream: str) -> None:
    env = {"ALLOW_TOKEN": TOKEN}
    banned, limited, denied = _fresh_ip(20), _fresh_ip(21), "192.0.2.9"
    async with (
        running_gateway(_cfg(upstream, "memory", "two"), env) as gw,
        aiohttp.ClientSession() as s,
    ):
        await _ban(s, gw, banned)
        assert await _get(s, gw, banned) == 403
        assert [await _get(s, gw, limited) for _ in range(3)] == [200, 200, 429]
        assert await _get(s, gw, denied) == 403

        # token-protected
        async with s.post(admin_url(gw, "/admin/allow"), json={}) as r:
            assert r.status == 401
        async with s.get(admin_url(gw, "/admin/allow")) as r:
            assert r.status == 401
        async with s.delete(admin_url(gw, f"/admin/allow/{banned}")) as r:
            assert r.status == 401

        for client in (banned, limited, denied):
            status, body = await _allow(s, gw, {"ip": client, "ttl_s": 60, "reason": "t-1"})
            assert status == 201, body
            assert body["ip"] == client
            assert 59 < body["expires_in_s"] <= 60
            assert body["reason"] == "t-1"
            assert body["by"] == "127.0.0.1"
        assert await _get(s, gw, banned) == 200  # the ban stays, but lets it through
        assert gw.runtime.bans.banned(banned) is not None
        assert [await _get(s, gw, limited) for _ in range(5)] == [200] * 5
        assert await _get(s, gw, denied) == 403  # deny_cidrs wins
        assert sorted(await _listed(s, gw)) == sorted([banned, limited, denied])
        assert _metric(gw, "gateway_allowed_requests_total") == 6
        # explain says why, and counts nothing
        explain = admin_url(gw, f"/admin/explain?ip={banned}&path=/x")
        async with s.get(explain, headers=AUTH) as r:
            answer = await r.json()
        assert answer["break_glass"]["reason"] == "t-1"
        assert answer["ban"] is not None
        assert answer["verdict"] is None or not answer["verdict"].startswith("403")
        assert _metric(gw, "gateway_allowed_requests_total") == 6
        assert _metric(gw, "gateway_allow_changes_total", action="added") == 3

        async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
            stats = await r.json()
        assert sorted(e["ip"] for e in stats["allow"]) == sorted([banned, limited, denied])

        async with s.delete(admin_url(gw, f"/admin/allow/{banned}"), headers=AUTH) as r:
            assert r.status == 200
            assert await r.json() == {"removed": banned}
        async with s.delete(admin_url(gw, f"/admin/allow/{banned}"), headers=AUTH) as r:
            assert r.status == 404
            assert r.content_type == "application/problem+json"
        assert await _get(s, gw, banned) == 403
        assert _metric(gw, "gateway_allow_changes_total", action="removed") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("not json", "body"),
        ({"ip": "nope", "ttl_s": 60, "reason": "r"}, "ip"),
        ({"ip": "10.0.0.0/8", "ttl_s": 60, "reason": "r"}, "ip"),
        ({"ip": "10.0.0.1", "ttl_s": 0, "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": 10**9, "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": 60, "reason": ""}, "reason"),
        ({"ip": "10.0.0.1", "ttl_s": 60, "reason": "r" * 500}, "reason"),
    ],
)
async def test_bad_allow_requests_are_400_naming_the_field(
    upstream: str, body: Any, field: str
) -> None:
    env = {"ALLOW_TOKEN": TOKEN}
    async with (
        running_gateway(_cfg(upstream, "memory", "two"), env) as gw,
        aiohttp.ClientSession() as s,
    ):
        data = body if isinstance(body, str) else None
        js = None if isinstance(body, str) else body
        async with s.post(admin_url(gw, "/admin/allow"), data=data, json=js, headers=AUTH) as r:
            assert r.status == 400
            assert r.content_type == "application/problem+json"
            problem = await r.json(content_type=None)
        assert problem["detail"].startswith(f"{field}: ")
        assert problem["errors"][0]["field"] == field
        assert await _listed(s, gw) == []


async def test_an_ipv6_client_is_allowed_by_its_prefix(upstream: str) -> None:
    env = {"ALLOW_TOKEN": TOKEN}
    async with (
        running_gateway(_cfg(upstream, "memory", "two"), env) as gw,
        aiohttp.ClientSession() as s,
    ):
        for _ in range(3):
            await _get(s, gw, "2001:db8:5::1")
        assert await _get(s, gw, "2001:db8:5::2") == 429  # one budget for the /64
        status, body = await _allow(s, gw, {"ip": "2001:db8:5::9", "ttl_s": 60, "reason": "r"})
        assert (status, body["ip"]) == (201, "2001:db8:5::/64")
        assert await _get(s, gw, "2001:db8:5::77") == 200
        quoted = "2001:db8:5::%2F64"
        async with s.delete(admin_url(gw, f"/admin/allow/{quoted}"), headers=AUTH) as r:
            assert r.status == 200
            assert await r.json() == {"removed": "2001:db8:5::/64"}
        assert await _get(s, gw, "2001:db8:5::77") == 429


async def test_two_gateways_on_one_redis(redis_url: str, upstream: str) -> None:
    env = {"ALLOW_TOKEN": TOKEN, "GATEWAY_REDIS_URL": redis_url}
    policy = f"p-{uuid.uuid4().hex[:8]}"
    banned, limited, denied = _fresh_ip(22), _fresh_ip(23), "192.0.2.10"
    async with (
        running_gateway(_cfg(upstream, "redis", policy), env) as a,
        running_gateway(_cfg(upstream, "redis", policy), env) as b,
        aiohttp.ClientSession() as s,
    ):
        try:
            await _ban(s, a, banned)
            await _until(lambda: _async(b.runtime.bans.banned(banned) is not None), 1.0)
            assert await _get(s, b, banned) == 403
            assert [await _get(s, gw, limited) for gw in (a, b, a)] == [200, 200, 429]

            for client in (banned, limited, denied):
                status, _ = await _allow(s, a, {"ip": client, "ttl_s": 30, "reason": "t-2"})
                assert status == 201
            # applies on the other replica within a second
            took = await _until(lambda: _status_is(s, b, banned, 200), 1.0)
            assert took < 1.0
            assert [await _get(s, b, limited) for _ in range(4)] == [200] * 4
            assert await _get(s, b, denied) == 403
            assert banned in await _listed(s, b)

            # removed on b: refused again on a within a second
            async with s.delete(admin_url(b, f"/admin/allow/{banned}"), headers=AUTH) as r:
                assert r.status == 200
            await _until(lambda: _status_is(s, a, banned, 403), 1.0)
            assert banned not in await _listed(s, a)
        finally:
            for client in (banned, limited, denied):
                async with s.delete(admin_url(a, f"/admin/allow/{client}"), headers=AUTH):
                    pass
            await a.runtime.bans.unban(banned)


async def _async(value: bool) -> bool:
    return value


async def _status_is(s: aiohttp.ClientSession, gw: Any, client: str, status: int) -> bool:
    return await _get(s, gw, client) == status


async def test_redis_down_keeps_entries_and_refuses_changes(
    private_redis: Any, upstream: str
) -> None:
    env = {"ALLOW_TOKEN": TOKEN, "GATEWAY_REDIS_URL": private_redis.url}
    client = _fresh_ip(24)
    async with (
        running_gateway(_cfg(upstream, "redis", "two"), env) as gw,
        aiohttp.ClientSession() as s,
    ):
        status, _ = await _allow(s, gw, {"ip": client, "ttl_s": 60, "reason": "r"})
        assert status == 201
        private_redis.stop()
        for _ in range(4):
            assert await _get(s, gw, client) == 200  # the entry held stays in force
        status, problem = await _allow(s, gw, {"ip": _fresh_ip(25), "ttl_s": 60, "reason": "r"})
        assert status == 503
        assert "not made" in problem["detail"]
        private_redis.start()  # empty: the entry is gone once read again
        allow = gw.runtime.allow
        await _until(lambda: _async(allow.covers(ipaddress.ip_address(client)) is None), 3.0)
        await _until(lambda: _status_is(s, gw, client, 429), 2.0)
        status, _ = await _allow(s, gw, {"ip": client, "ttl_s": 60, "reason": "again"})
        assert status == 201
        assert await _get(s, gw, client) == 200


async def test_an_ipv4_mapped_entry_lets_the_ipv4_client_through(upstream: str) -> None:
    env = {"ALLOW_TOKEN": TOKEN}
    banned = _fresh_ip(24)
    async with (
        running_gateway(_cfg(upstream, "memory", "two"), env) as gw,
        aiohttp.ClientSession() as s,
    ):
        await _ban(s, gw, banned)
        assert await _get(s, gw, f"::ffff:{banned}") == 403  # the ban is the IPv4 client's
        status, body = await _allow(s, gw, {"ip": f"::ffff:{banned}", "ttl_s": 60, "reason": "r"})
        assert (status, body["ip"]) == (201, banned)
        assert await _get(s, gw, banned) == 200
        # the entry is not ::/64: an IPv6 client there keeps its limit
        assert [await _get(s, gw, "::2") for _ in range(3)] == [200, 200, 429]
        mapped = f"/admin/allow/::ffff:{banned}"
        async with s.delete(admin_url(gw, mapped), headers=AUTH) as r:
            assert (r.status, await r.json()) == (200, {"removed": banned})
        assert await _get(s, gw, banned) == 403


async def test_a_zoned_prefix_is_one_entry_on_redis(redis_url: str, upstream: str) -> None:
    env = {"ALLOW_TOKEN": TOKEN, "GATEWAY_REDIS_URL": redis_url}
    policy = f"p-{uuid.uuid4().hex[:8]}"
    n = uuid.uuid4().int & 0xFFFF
    prefix = f"2001:db8:{n:x}::/64"
    async with (
        running_gateway(_cfg(upstream, "redis", policy), env) as a,
        aiohttp.ClientSession() as s,
    ):
        try:
            for ip in (f"2001:db8:{n:x}::%eth0/64", prefix):
                status, body = await _allow(s, a, {"ip": ip, "ttl_s": 30, "reason": "r"})
                assert (status, body["ip"]) == (201, prefix)
            async with s.delete(admin_url(a, f"/admin/allow/{prefix}"), headers=AUTH) as r:
                assert r.status == 200
            assert prefix not in await _listed(s, a)  # read from Redis
        finally:
            async with s.delete(admin_url(a, f"/admin/allow/{prefix}"), headers=AUTH):
                pass
