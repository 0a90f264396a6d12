"""The protection steps of the pipeline, end to end over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.problem import ABNORMAL_USAGE, QUOTA_EXCEEDED
from tests.conftest import free_port
from tests.gw import base_config, raw_exchange, running_gateway, serve, url

pytestmark = pytest.mark.timeout(60)


class Counting:
    """An upstream that counts hits and answers with a status that can be switched."""

    def __init__(self) -> None:
        self.hits = 0
        self.status = 200
        self.delay = 0.0
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.Response(text="ok")
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.path.startswith("/code/"):
            return web.Response(status=int(request.path[6:]))
        return web.Response(
            status=self.status, text="up", headers={"X-Frame-Options": "SAMEORIGIN"}
        )


@pytest.fixture
async def up() -> AsyncIterator[tuple[Counting, str]]:
    c = Counting()
    async with serve(c.app) as url_:
        yield c, url_


def _limited(
    upstream: str, policies: dict[str, Any], names: list[str], **kw: Any
) -> dict[str, Any]:
    return base_config(
        upstream,
        rate_limit={"policies": policies},
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": names}],
        **kw,
    )


async def test_rate_limit_burst_then_429_with_headers(up: Any) -> None:
    c, u = up
    cfg = _limited(
        u, {"per-ip-burst": {"requests": 1, "period_s": 2, "burst": 3}}, ["per-ip-burst"]
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        remaining = []
        for _ in range(3):
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 200
                assert r.headers["RateLimit-Policy"] == '"per-ip-burst";q=1;w=2'
                remaining.append(r.headers["RateLimit"])
        assert remaining[0].startswith('"per-ip-burst";r=2;t=')
        assert remaining[2].startswith('"per-ip-burst";r=0;t=')
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 429
            assert r.headers["Content-Type"] == "application/problem+json"
            assert r.headers["Retry-After"] == "2"
            assert r.headers["RateLimit-Policy"] == '"per-ip-burst";q=1;w=2'
            assert r.headers["RateLimit"] == '"per-ip-burst";r=0;t=6'
            doc = await r.json(content_type=None)
            assert doc["type"] == QUOTA_EXCEEDED
            assert doc["violated_policies"] == ["per-ip-burst"]
            assert doc["request_id"] == r.headers["X-Request-ID"]
    assert c.hits == 3


async def test_shadow_policy_never_blocks_and_tightest_policy_is_reported(up: Any) -> None:
    c, u = up
    cfg = _limited(
        u,
        {
            "loose": {"requests": 100, "period_s": 1},
            "shadow": {"requests": 1, "period_s": 60, "burst": 1, "mode": "shadow"},
        },
        ["loose", "shadow"],
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 200
                assert r.headers["RateLimit-Policy"] == '"loose";q=100;w=1'
        m = gw.runtime.metrics.registry.get_sample_value
        assert (
            m(
                "gateway_ratelimit_decisions_total",
                {"policy": "shadow", "decision": "shadow_limited"},
            )
            == 4
        )
        assert (
            m("gateway_ratelimit_decisions_total", {"policy": "loose", "decision": "allowed"}) == 5
        )
    assert c.hits == 5


async def test_allow_cidrs_are_never_limited_and_deny_cidrs_get_403(up: Any) -> None:
    _, u = up
    p = {"tiny": {"requests": 1, "period_s": 60, "burst": 1}}
    async with running_gateway(_limited(u, p, ["tiny"], allow_cidrs=["127.0.0.0/8"])) as gw:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(url(gw, "/x")) as r:
                    assert r.status == 200
    async with running_gateway(_limited(u, p, ["tiny"], deny_cidrs=["127.0.0.1/32"])) as gw:
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
            assert r.status == 403
            assert r.headers["Content-Type"] == "application/problem+json"


async def test_keys_route_and_header(up: Any) -> None:
    _, u = up
    cfg = base_config(
        u,
        trusted_proxies=["127.0.0.1/32"],
        rate_limit={
            "policies": {
                "by-user": {"requests": 1, "period_s": 60, "burst": 2, "key": "header:X-User"},
                "whole-route": {"requests": 1, "period_s": 60, "burst": 5, "key": "route"},
            }
        },
        routes=[
            {"name": "user", "path_prefix": "/u/", "upstream": "api", "rate_limits": ["by-user"]},
            {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["whole-route"]},
        ],
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        statuses = []
        for user in ("a", "a", "a", "b", "b"):
            async with s.get(url(gw, "/u/x"), headers={"X-User": user}) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 429, 200, 200]
        # route key: shared by different clients (different XFF addresses)
        statuses = []
        for i in range(6):
            async with s.get(url(gw, "/r"), headers={"X-Forwarded-For": f"203.0.113.{i}"}) as r:
                statuses.append(r.status)
        assert statuses == [200] * 5 + [429]


async def test_scanner_is_banned_and_upstream_sees_nothing_after(up: Any) -> None:
    c, u = up
    cfg = base_config(u, abuse={"ban_score": 50, "ban_s": 60})
    paths = ["/.env", "/.git/config", "/wp-login.php", "/phpmyadmin", "/wp-admin", "/.env"]
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        statuses = []
        for p in paths:
            async with s.get(url(gw, p)) as r:
                statuses.append(r.status)
        hits_at_ban = c.hits
        # suspicious_path scores 25: the second one bans, before it is proxied
        assert statuses[0] == 200
        assert statuses[1:] == [403] * 5
        assert hits_at_ban == 1
        async with s.get(url(gw, "/normal")) as r:
            assert r.status == 403
            assert (await r.json(content_type=None))["status"] == 403
        assert c.hits == 1
        m = gw.runtime.metrics.registry.get_sample_value
        assert m("gateway_bans_total", {"reason": "suspicious_path"}) == 1
        assert m("gateway_active_bans", {}) == 1


async def test_ban_status_429_uses_abnormal_usage_type(up: Any) -> None:
    _, u = up
    cfg = base_config(u, abuse={"ban_status": 429})
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(url(gw, "/.env")) as r:
                pass
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) > 500
            assert (await r.json(content_type=None))["type"] == ABNORMAL_USAGE


async def test_abuse_shadow_mode_blocks_nothing(up: Any) -> None:
    c, u = up
    async with running_gateway(base_config(u, abuse={"mode": "shadow"})) as gw:
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.get(url(gw, "/.env")) as r:
                    assert r.status == 200
        assert (
            gw.runtime.metrics.registry.get_sample_value(
                "gateway_bans_total", {"reason": "suspicious_path"}
            )
            == 1
        )
    assert c.hits == 4


async def test_route_guards_source_cidrs_and_shared_secret(up: Any) -> None:
    c, u = up
    cfg = base_config(
        u,
        routes=[
            {
                "name": "bot",
                "path_prefix": "/bot/",
                "upstream": "api",
                "methods": ["POST"],
                "shared_secret": {
                    "header": "X-Telegram-Bot-Api-Secret-Token",
                    "value_env": "BOT_S",
                },
            },
            {
                "name": "tg",
                "path_prefix": "/tg/",
                "upstream": "api",
                "source_cidrs": ["149.154.160.0/20"],
            },
        ],
    )
    async with running_gateway(cfg, env={"BOT_S": "right"}) as gw, aiohttp.ClientSession() as s:
        hdr = "X-Telegram-Bot-Api-Secret-Token"
        async with s.post(url(gw, "/bot/hook"), headers={hdr: "right"}) as r:
            assert r.status == 200
        async with s.post(url(gw, "/bot/hook"), headers={hdr: "wrong"}) as r:
            assert r.status == 403
        async with s.post(url(gw, "/bot/hook")) as r:
            assert r.status == 403
        assert gw.runtime.bans.score("127.0.0.1") >= 6  # two auth failures at 3
        async with s.get(url(gw, "/tg/x")) as r:
            assert r.status == 403
    assert c.hits == 1


@pytest.mark.parametrize(
    "target",
    [
        "/x/../admin/users",
        "/x/%2e%2e/admin/users",
        "/x%2F..%2Fadmin/users",
        "/admin//users",
        "/admin/./users",
        "http://h/x/../admin/users",
    ],
)
async def test_a_guarded_route_cannot_be_reached_around_its_prefix(up: Any, target: str) -> None:
    """Dot segments and doubled slashes do not get a request past a guarded route: an
    upstream that normalises the path would serve the guarded resource."""
    c, u = up
    cfg = base_config(
        u,
        routes=[
            {"name": "admin", "path_prefix": "/admin/", "upstream": "api",
             "shared_secret": {"header": "X-Secret", "value_env": "ADMIN_S"}},
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
    )  # fmt: skip
    async with running_gateway(cfg, env={"ADMIN_S": "right"}) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(
            gw.proxy_port, f"GET {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:60]
        plain = await raw_exchange(gw.proxy_port, b"GET /x/y/ HTTP/1.1\r\nHost: h\r\n\r\n")
        assert plain.startswith(b"HTTP/1.1 200 ")
    assert c.hits == 1


async def test_secret_route_with_unset_env_refuses_everything(up: Any) -> None:
    c, u = up
    cfg = base_config(
        u,
        routes=[{"name": "bot", "path_prefix": "/", "upstream": "api",
                 "shared_secret": {"header": "X-S", "value_env": "UNSET_SECRET"}}],
    )  # fmt: skip
    async with running_gateway(cfg, env={}) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/x"), headers={"X-S": ""}) as r:
            assert r.status == 403
    assert c.hits == 0


async def test_breaker_opens_and_upstream_stops_being_hit_then_recovers(up: Any) -> None:
    c, u = up
    c.status = 503
    cfg = base_config(
        u,
        upstreams={
            "api": {
                "url": u,
                "circuit_breaker": {
                    "consecutive_failures": 3,
                    "open_s": 0.5,
                    "half_open_requests": 1,
                },
                "health": {"interval_s": 0.2},
            }
        },
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(6):
            async with s.get(url(gw, "/x")) as r:
                statuses.append(r.status)
                if r.status == 503 and c.hits >= 3:
                    retry_after = r.headers.get("Retry-After")
        assert statuses[:3] == [503, 503, 503]  # the upstream's own 503s, passed through
        assert c.hits == 3, "the breaker is open: the upstream is not contacted"
        assert retry_after == "1"
        m = gw.runtime.metrics.registry.get_sample_value
        assert m("gateway_circuit_state", {"upstream": "api", "state": "open"}) == 1
        c.status = 200
        await asyncio.sleep(0.6)
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 200  # the half-open trial succeeds
        assert m("gateway_circuit_state", {"upstream": "api", "state": "closed"}) == 1
        assert (
            m(
                "gateway_circuit_transitions_total",
                {"upstream": "api", "from_state": "closed", "to_state": "open"},
            )
            == 1
        )


async def test_bulkhead_refuses_at_once_over_max_inflight(up: Any) -> None:
    c, u = up
    c.delay = 0.5
    cfg = base_config(u, upstreams={"api": {"url": u, "max_inflight": 2}})
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:

        async def one() -> int:
            async with s.get(url(gw, "/x")) as r:
                return r.status

        results = await asyncio.gather(*(one() for _ in range(5)))
    assert sorted(results) == [200, 200, 503, 503, 503]


async def test_get_is_retried_after_refused_connection_but_post_is_not(up: Any) -> None:
    _, u = up
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = base_config(
        u,
        upstreams={
            "api": {
                "url": dead,
                "retries": {"attempts": 3, "backoff_s": 0.01, "budget_ratio": 1.0},
                "circuit_breaker": {"consecutive_failures": 100},
            }
        },
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        m = gw.runtime.metrics.registry.get_sample_value
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 502
        assert m("gateway_upstream_errors_total", {"upstream": "api", "kind": "connect"}) == 3
        async with s.post(url(gw, "/x"), data=b"x") as r:
            assert r.status == 502
        assert m("gateway_upstream_errors_total", {"upstream": "api", "kind": "connect"}) == 4


async def test_security_headers_override_and_hsts_only_over_trusted_https(up: Any) -> None:
    _, u = up
    cfg = base_config(u, security_headers={"override": True}, trusted_proxies=["127.0.0.1/32"])
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/x")) as r:
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "Strict-Transport-Security" not in r.headers
        async with s.get(url(gw, "/x"), headers={"X-Forwarded-Proto": "https"}) as r:
            assert r.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
        async with s.get(url(gw, "/nope/../x"), headers={"Host": ""}) as r:
            assert "Server" not in r.headers


async def test_upstream_404_and_401_are_scored(up: Any) -> None:
    _, u = up
    async with running_gateway(base_config(u)) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/code/404")) as r:
            assert r.status == 404
        async with s.get(url(gw, "/code/401")) as r:
            assert r.status == 401
        assert gw.runtime.bans.score("127.0.0.1") == pytest.approx(4, abs=0.1)
