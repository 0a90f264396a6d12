"""Ban evidence through a real Redis, and over real sockets: kept with the ban, shown by
every replica's /admin/bans and /admin/stats, never a query string."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

from gateway.core.evidence import MAX_EVIDENCE, Seen
from tests.conftest import free_port
from tests.gw import admin_url, base_config, running_gateway, url
from tests.integration.test_bans_redis import Replicas, eventually, replicas  # noqa: F401

pytestmark = pytest.mark.timeout(60)

TOKEN = "evidence-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _fresh_ip(first: int) -> str:
    n = uuid.uuid4().int
    return f"{first}.{n >> 16 & 255}.{n >> 8 & 255}.{n % 250 + 1}"


async def test_redis_ban_evidence_is_shared_with_the_ban(replicas: Replicas) -> None:  # noqa: F811
    a, b = await replicas.store(), await replicas.store()
    ip = _fresh_ip(100)
    for i in range(12):  # scored on both replicas: one score, one evidence list
        (a if i % 2 else b).report(ip, "not_found", Seen("GET", f"/n{i}", 404, f"r{i}"))
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    a.report(ip, "suspicious_path", Seen("GET", "/.env", None, "r-env"))
    a.report(ip, "suspicious_path", Seen("GET", "/.git/config", None, "r-git"))
    await eventually(lambda: b.banned(ip) is not None, 2.0)
    for store in (a, b):
        found = await store.evidence([ip])
        records = found[ip]
        assert len(records) == MAX_EVIDENCE
        assert [r.request_id for r in records][-2:] == ["r-env", "r-git"]
        assert records[-1].path == "/.git/config"
        assert records[-1].status is None
        assert records[0].status == 404
        assert {r.request_id for r in records[:-2]} <= {f"r{i}" for i in range(12)}
    # unbanned: no evidence is listed any more, and a later ban starts afresh
    assert await b.unban(ip)
    assert await a.evidence([ip]) == {}
    await eventually(lambda: a.banned(ip) is None, 1.0)
    a.report(ip, "suspicious_path", Seen("POST", "/wp-login.php", 404, "again-1"))
    a.report(ip, "suspicious_path", Seen("POST", "/wp-login.php", 404, "again-2"))
    await eventually(lambda: b.banned(ip) is not None, 2.0)
    found = await b.evidence([ip])
    assert [r.request_id for r in found[ip]] == ["again-1", "again-2"]


async def test_evidence_of_bans_made_while_redis_was_away(private_redis: Any) -> None:
    r = Replicas(private_redis.url)
    try:
        a, b = await r.store(), await r.store()
        private_redis.stop()
        ip = "192.0.2.77"
        a.report(ip, "suspicious_path", Seen("GET", "/.env", None, "o1"))
        await eventually(lambda: a.degraded, 3.0)
        a.report(ip, "suspicious_path", Seen("GET", "/.env", None, "o2"))
        await eventually(lambda: a.banned(ip) is not None, 3.0)
        assert [e.request_id for e in (await a.evidence([ip]))[ip]][-1] == "o2"
        private_redis.start()
        await eventually(lambda: not a.degraded and not b.degraded, 5.0)
        await eventually(lambda: b.banned(ip) is not None, 2.0)
        found = await b.evidence([ip])
        assert found[ip][-1].request_id == "o2"
    finally:
        await r.cleanup()


def _cfg(upstream: str, **extra: Any) -> dict[str, Any]:
    return base_config(
        upstream,
        trusted_proxies=["127.0.0.1/32"],
        admin={"host": "127.0.0.1", "port": free_port(), "token_env": "EV_TOKEN"},
        **extra,
    )


async def _bans(s: aiohttp.ClientSession, gw: Any) -> list[dict[str, Any]]:
    async with s.get(admin_url(gw, "/admin/bans"), headers=AUTH) as r:
        assert r.status == 200
        bans: list[dict[str, Any]] = (await r.json())["bans"]
        return bans


async def _stats_bans(s: aiohttp.ClientSession, gw: Any) -> list[dict[str, Any]]:
    async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
        assert r.status == 200
        bans: list[dict[str, Any]] = (await r.json())["bans"]
        return bans


async def _scan(s: aiohttp.ClientSession, gw: Any, ip: str) -> list[int]:
    """Two unknown paths, then two probes for secrets (with queries): a ban."""
    statuses: list[int] = []
    for target in ("/missing?token=SECRET1", "/a/../missing2", "/.env?x=SECRET2", "/.git//config"):
        headers = {"X-Forwarded-For": ip, "X-Request-ID": f"rid-{len(statuses)}"}
        async with s.get(url(gw, target), headers=headers) as r:
            statuses.append(r.status)
    return statuses


async def _not_found(_: Any) -> Any:
    from aiohttp import web

    return web.Response(status=404, text="no")


def _expected(ev: list[dict[str, Any]]) -> None:
    # /.env is scored for its path before it is answered (no status), then for the
    # upstream's 404; /.git/config's path score bans it. In memory the ban answers that
    # request; through Redis the ban may come back after it went upstream (a 404 more).
    found = [(e["request_id"], e["reason"], e["path"], e["status"]) for e in ev]
    late = ("rid-3", "not_found", "/.git/config", 404)
    assert [f for f in found if f != late] == [
        ("rid-0", "not_found", "/missing", 404),
        ("rid-1", "not_found", "/missing2", 404),
        ("rid-2", "suspicious_path", "/.env", None),
        ("rid-2", "not_found", "/.env", 404),
        ("rid-3", "suspicious_path", "/.git/config", None),
    ]
    assert all(e["method"] == "GET" and e["at"] > 0 for e in ev)
    assert "SECRET" not in str(ev)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_admin_bans_and_stats_show_evidence(backend: str, redis_url: str) -> None:
    from tests.gw import serve

    ip = _fresh_ip(101)
    env = {"EV_TOKEN": TOKEN, "GATEWAY_REDIS_URL": redis_url}
    async with serve(_not_found) as up:
        extra: dict[str, Any] = {"rate_limit": {"backend": backend}} if backend == "redis" else {}
        # the first ban gets 403 on its own request (a ban made from a path score answers it)
        async with running_gateway(_cfg(up, **extra), env) as gw, aiohttp.ClientSession() as s:
            statuses = await _scan(s, gw, ip)
            assert statuses[:2] == [404, 404]
            await eventually(lambda: gw.runtime.bans.banned(ip) is not None, 2.0)
            async with s.get(url(gw, "/refused"), headers={"X-Forwarded-For": ip}) as r:
                assert r.status == 403  # refused by the ban: not an event
            bans = [b for b in await _bans(s, gw) if b["ip"] == ip]
            assert len(bans) == 1
            _expected(bans[0]["evidence"])
            shown = [b for b in await _stats_bans(s, gw) if b["ip"] == ip]
            _expected(shown[0]["evidence"])
            if backend == "redis":
                await gw.runtime.bans.unban(ip)


async def test_two_gateways_on_one_redis_show_the_same_evidence(redis_url: str) -> None:
    from tests.gw import serve

    ip = _fresh_ip(102)
    env = {"EV_TOKEN": TOKEN, "GATEWAY_REDIS_URL": redis_url}
    cfg = {"rate_limit": {"backend": "redis"}}
    async with (
        serve(_not_found) as up,
        running_gateway(_cfg(up, **cfg), env) as a,
        running_gateway(_cfg(up, **cfg), env) as b,
        aiohttp.ClientSession() as s,
    ):
        await _scan(s, a, ip)
        await eventually(lambda: b.runtime.bans.banned(ip) is not None, 2.0)
        bans = [x for x in await _bans(s, b) if x["ip"] == ip]
        _expected(bans[0]["evidence"])
        await b.runtime.bans.unban(ip)
