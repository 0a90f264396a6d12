"""The operator page's files and GET /admin/stats (SPEC section 12, first bullet)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from tests.gw import admin_url, base_config, running_gateway, serve, url

pytestmark = pytest.mark.timeout(30)

TOKEN = "st4ts-t0ken-value-7c1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"GATEWAY_ADMIN_TOKEN": TOKEN}
UI_PATHS = ("/admin/ui", "/admin/ui/app.js", "/admin/ui/style.css")


async def upstream_handler(request: web.Request) -> web.Response:
    """200 ``ok``, but a 502 for ``/boom``."""
    if request.path == "/boom":
        return web.Response(status=502, text="bad")
    return web.Response(text="ok")


@pytest.fixture
async def up_url() -> AsyncIterator[str]:
    async with serve(upstream_handler) as url_:
        yield url_


def traffic_config(up_url: str) -> dict[str, Any]:
    """Clients by X-Forwarded-For; route `api` limited to 2 requests a minute per client."""
    return base_config(
        up_url,
        trusted_proxies=["127.0.0.0/8"],
        routes=[
            {"name": "api", "path_prefix": "/api", "upstream": "api", "rate_limits": ["two"]},
            {"name": "site", "path_prefix": "/", "upstream": "api"},
        ],
        rate_limit={"policies": {"two": {"requests": 2, "period_s": 60, "burst": 2}}},
    )


async def send_traffic(s: aiohttp.ClientSession, gw: Gateway) -> None:
    """Traffic on both routes, one 5xx, 429s for 10.0.0.7, a ban of 10.0.0.66."""
    for path in ("/", "/a", "/b", "/boom"):
        async with s.get(url(gw, path), headers={"X-Forwarded-For": "10.0.0.1"}) as r:
            await r.read()
    statuses = []
    for _ in range(4):
        async with s.get(url(gw, "/api/x"), headers={"X-Forwarded-For": "10.0.0.7"}) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 429, 429]
    for _ in range(2):  # two suspicious paths (25 points each) reach ban_score 50
        async with s.get(url(gw, "/.env"), headers={"X-Forwarded-For": "10.0.0.66"}) as r:
            await r.read()


async def test_ui_files_need_no_token_and_carry_a_strict_csp(up_url: str) -> None:
    async with running_gateway(base_config(up_url), ENV) as gw, aiohttp.ClientSession() as s:
        for path in UI_PATHS:
            async with s.get(admin_url(gw, path)) as r:
                body = await r.text()
                assert r.status == 200, path
                csp = r.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with s.get(admin_url(gw, "/admin/ui")) as r:
            assert r.content_type == "text/html"
            body = await r.text()
            assert '<script src="ui/app.js">' in body
            assert TOKEN not in body
        # only these exact paths pass without a token
        for path in ("/admin/ui/", "/admin/ui/other.js", "/admin/uix", "/admin/stats"):
            async with s.get(admin_url(gw, path)) as r:
                assert r.status == 401, path


async def test_without_admin_token_page_is_served_and_stats_is_403(up_url: str) -> None:
    async with running_gateway(base_config(up_url), {}) as gw, aiohttp.ClientSession() as s:
        async with s.get(admin_url(gw, "/admin/ui")) as r:
            assert r.status == 200
        async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
            assert r.status == 403


async def test_stats_reports_traffic_limits_bans_and_config(up_url: str) -> None:
    cfg = traffic_config(up_url)
    async with running_gateway(cfg, ENV) as gw, aiohttp.ClientSession() as s:
        await send_traffic(s, gw)
        before = time.time()
        async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
            assert r.status == 200
            assert r.content_type == "application/json"
            d = await r.json()
        async with s.get(
            admin_url(gw, "/admin/stats"), headers={"Authorization": "Bearer no"}
        ) as r:
            assert r.status == 401

    assert before - 1 < d["generated_at"] <= before + 5
    assert d["version"]
    assert d["status"] in ("healthy", "degraded", "unhealthy")
    assert d["draining"] is False
    (comp,) = [c for c in d["components"] if c["name"] == "upstream:api"]
    assert set(comp) == {"name", "status", "critical", "since", "message"}
    assert d["upstreams"] == [
        {"name": "api", "breaker": "closed", "inflight": 0, "limit": 500, "mode": "fixed"}
    ]
    routes = {r["name"]: r for r in d["routes"]}
    site = routes["site"]
    # 4 requests and the first probe (the second one, refused by the ban, has no route)
    assert site["rps"] == pytest.approx(5 / 60, abs=1e-3)
    assert site["error_ratio"] == pytest.approx(1 / 5, abs=1e-3)  # the 502
    assert 0 < site["p50_ms"] <= site["p99_ms"] < 5000
    assert len(site["history"]) == 30
    assert set(site["history"][-1]) >= {"rps", "error_ratio", "p50_ms", "p99_ms"}
    assert sum(h["rps"] for h in site["history"]) * 10 == pytest.approx(5)
    assert routes["api"]["rps"] == pytest.approx(4 / 60, abs=1e-3)
    assert d["limited"] == [{"key": "10.0.0.7", "count": 2}]
    (ban,) = d["bans"]
    assert ban["ip"] == "10.0.0.66"
    assert ban["reason"] == "suspicious_path"
    assert ban["score"] >= 50
    assert 590 < ban["expires_in_s"] <= 600
    # the two probes: the first was answered by the upstream, the second banned it
    assert [(e["reason"], e["method"], e["path"]) for e in ban["evidence"]] == [
        ("suspicious_path", "GET", "/.env"),
        ("suspicious_path", "GET", "/.env"),
    ]
    assert all(e["request_id"] and before - 60 < e["at"] <= before + 1 for e in ban["evidence"])
    c = d["config"]
    assert c["generation"] == 1
    assert c["digest"] == gw.runtime.settings.digest
    assert c["last_reload"] is None


async def test_stats_counts_applied_configs_and_reports_the_last_reload(
    tmp_path: Path, up_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)  # a reload reads the environment
    path = tmp_path / "gateway.yaml"
    cfg = base_config(up_url, reload={"interval_s": 3600})
    path.write_text(yaml.safe_dump(cfg))
    async with (
        running_gateway(cfg, ENV, path=str(path)) as gw,
        aiohttp.ClientSession() as s,
    ):

        async def reload_then_stats() -> dict[str, Any]:
            async with s.post(admin_url(gw, "/admin/reload"), headers=AUTH) as r:
                await r.read()
            async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
                body = await r.json()
                assert r.status == 200, body
                data: dict[str, Any] = body["config"]
                return data

        before = time.time()
        cfg["routes"][0]["path_prefix"] = "/v1"
        path.write_text(yaml.safe_dump(cfg))
        ok = await reload_then_stats()
        assert ok["source"] == str(path)
        assert ok["generation"] == 2
        assert ok["last_reload"]["result"] == "success"
        assert before - 1 < ok["last_reload"]["at"] <= time.time()
        assert ok["last_reload"]["error"] is None

        path.write_text("routes: [")
        failed = await reload_then_stats()
        assert failed["generation"] == 2  # nothing applied
        assert failed["digest"] == ok["digest"]
        assert failed["last_reload"]["result"] == "failure"
        assert failed["last_reload"]["error"]


async def test_component_since_moves_only_when_its_status_changes() -> None:
    failing = False

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=503 if failing and request.path == "/health" else 200)

    async def upstream_component(s: aiohttp.ClientSession, gw: Gateway) -> dict[str, Any]:
        async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
            found: list[dict[str, Any]] = (await r.json())["components"]
            (comp,) = [c for c in found if c["name"] == "upstream:api"]
            return comp

    async with (
        serve(handle) as up,
        running_gateway(base_config(up), ENV) as gw,
        aiohttp.ClientSession() as s,
    ):
        first = await upstream_component(s, gw)
        assert first["status"] == "healthy"
        assert first["since"] is not None
        await asyncio.sleep(0.5)  # two more checks (interval_s 0.2), the same result
        assert (await upstream_component(s, gw))["since"] == first["since"]
        failing = True
        comp = first
        for _ in range(50):
            comp = await upstream_component(s, gw)
            if comp["status"] != "healthy":
                break
            await asyncio.sleep(0.1)
        assert comp["status"] != "healthy"
        assert comp["since"] > first["since"]


async def test_stats_shows_an_adaptive_limit_and_lists_the_newest_bans_only(
    up_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adaptive upstream shows its learned limit and mode; under many bans the page
    gets the newest STATS_BANS of them and the count of all."""
    from gateway.admin import api

    monkeypatch.setattr(api, "STATS_BANS", 1)
    cfg = base_config(
        up_url,
        trusted_proxies=["127.0.0.0/8"],
        upstreams={"api": {"url": up_url, "concurrency": {"mode": "adaptive", "min": 4}}},
    )
    async with running_gateway(cfg, ENV) as gw, aiohttp.ClientSession() as s:
        for client in ("10.0.0.81", "10.0.0.82"):
            for _ in range(2):
                async with s.get(url(gw, "/.env"), headers={"X-Forwarded-For": client}) as r:
                    await r.read()
            await asyncio.sleep(0.01)  # the second ban is the newer one
        async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
            assert r.status == 200
            d = await r.json()
    (up,) = d["upstreams"]
    assert up["mode"] == "adaptive"
    assert up["limit"] == gw.runtime.upstreams["api"].limit
    assert up["limit"] != 500  # not max_inflight: the learned limit
    assert d["bans_total"] == 2
    assert [b["ip"] for b in d["bans"]] == ["10.0.0.82"]


async def page_routes(s: aiohttp.ClientSession, gw: Gateway) -> list[str]:
    """The names of the routes the operator page lists."""
    async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
        return [row["name"] for row in (await r.json())["routes"]]


async def test_a_route_removed_by_a_reload_leaves_the_page(
    tmp_path: Path, up_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page lists the routes being served: a route a reload removed does not stay on
    it with the figures of its last minutes (requests that did not match are kept)."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    path = tmp_path / "gateway.yaml"
    cfg = traffic_config(up_url)
    cfg["reload"] = {"interval_s": 3600}
    path.write_text(yaml.safe_dump(cfg))
    async with (
        running_gateway(cfg, ENV, path=str(path)) as gw,
        aiohttp.ClientSession() as s,
    ):
        for path_ in ("/api/x", "/", "/y"):
            async with s.get(url(gw, path_)) as r:
                await r.read()
        assert await page_routes(s, gw) == ["api", "site"]

        cfg["routes"] = [{"name": "api", "path_prefix": "/api", "upstream": "api"}]
        path.write_text(yaml.safe_dump(cfg))
        async with s.post(admin_url(gw, "/admin/reload"), headers=AUTH) as r:
            assert r.status == 200, await r.text()
        assert await page_routes(s, gw) == ["api"]
        async with s.get(url(gw, "/y")) as r:  # now matches no route
            assert r.status == 404
        assert await page_routes(s, gw) == ["api", "none"]
        async with s.get(url(gw, "/api/x")) as r:
            await r.read()
        async with s.get(admin_url(gw, "/admin/stats"), headers=AUTH) as r:
            (api,) = [row for row in (await r.json())["routes"] if row["name"] == "api"]
        assert api["rps"] == round(2 / 60, 3)  # the route kept its figures


async def test_a_request_in_flight_on_a_removed_route_does_not_bring_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request the old config routed, answered after the reload that removed its route,
    is counted in the metrics but does not put the route back on the page."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        if request.path == "/old/slow":
            arrived.set()
            await release.wait()
        return web.Response(text="ok")

    async with serve(slow) as up:
        path = tmp_path / "gateway.yaml"
        cfg = base_config(
            up,
            routes=[
                {"name": "old", "path_prefix": "/old", "upstream": "api"},
                {"name": "api", "path_prefix": "/", "upstream": "api"},
            ],
        )
        cfg["reload"] = {"interval_s": 3600}
        path.write_text(yaml.safe_dump(cfg))
        async with (
            running_gateway(cfg, ENV, path=str(path)) as gw,
            aiohttp.ClientSession() as s,
        ):

            async def slow_request() -> int:
                async with s.get(url(gw, "/old/slow")) as r:
                    await r.read()
                    return r.status

            async with s.get(url(gw, "/old/a")) as r:
                await r.read()
            in_flight = asyncio.create_task(slow_request())
            await asyncio.wait_for(arrived.wait(), 5)
            cfg["routes"] = [{"name": "api", "path_prefix": "/", "upstream": "api"}]
            path.write_text(yaml.safe_dump(cfg))
            async with s.post(admin_url(gw, "/admin/reload"), headers=AUTH) as r:
                assert r.status == 200, await r.text()
            assert await page_routes(s, gw) == []
            release.set()
            assert await in_flight == 200
            async with s.get(url(gw, "/b")) as r:
                await r.read()
            assert await page_routes(s, gw) == ["api"]
            async with s.get(admin_url(gw, "/metrics"), headers=AUTH) as r:
                text = await r.text()
            assert 'gateway_requests_total{code="200",method="GET",route="old"} 2.0' in text

            cfg["routes"] = [  # configured again: listed again
                {"name": "old", "path_prefix": "/old", "upstream": "api"},
                {"name": "api", "path_prefix": "/", "upstream": "api"},
            ]
            path.write_text(yaml.safe_dump(cfg))
            async with s.post(admin_url(gw, "/admin/reload"), headers=AUTH) as r:
                assert r.status == 200, await r.text()
            async with s.get(url(gw, "/old/c")) as r:
                await r.read()
            assert await page_routes(s, gw) == ["api", "old"]
