"""Overload protection (SPEC section 10), end to end over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.config import load_text
from tests.gw import admin_url, base_config, running_gateway, serve, url, wait_for

pytestmark = pytest.mark.timeout(60)


class Held:
    """An upstream that holds every request until it is let go; it counts those it holds."""

    def __init__(self) -> None:
        self.active = 0
        self.hits = 0
        self.go = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.Response(text="ok")
        self.hits += 1
        self.active += 1
        try:
            await self.go.wait()
        finally:
            self.active -= 1
        return web.Response(text="up")


@pytest.fixture
async def held() -> AsyncIterator[tuple[Held, str]]:
    h = Held()
    async with serve(h.app) as url_:
        yield h, url_


def _prioritised(u: str, **up: Any) -> dict[str, Any]:
    return base_config(
        u,
        upstreams={"api": {"url": u, "max_inflight": 10, **up}},
        routes=[
            {"name": "login", "path_prefix": "/crit/", "upstream": "api", "priority": "critical"},
            {"name": "export", "path_prefix": "/bulk/", "upstream": "api", "priority": "bulk"},
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
    )


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str, h: Held) -> None:
        self.s = session
        self.base = base
        self.h = h
        self.tasks: list[asyncio.Task[int]] = []

    async def _get(self, path: str) -> int:
        async with self.s.get(self.base + path) as r:
            await r.read()
            return r.status

    async def hold(self, path: str, n: int) -> None:
        """Start ``n`` requests that the upstream holds; wait until it holds them."""
        want = self.h.active + n
        self.tasks += [asyncio.create_task(self._get(path)) for _ in range(n)]
        assert await wait_for(lambda: self.h.active >= want)

    async def refused(self, path: str) -> dict[str, Any]:
        hits = self.h.hits
        async with self.s.get(self.base + path) as r:
            assert r.status == 503, path
            assert r.headers["Content-Type"] == "application/problem+json"
            assert int(r.headers["Retry-After"]) >= 1
            body: dict[str, Any] = await r.json(content_type=None)
        assert self.h.hits == hits, "a refused request never reaches the upstream"
        return body

    async def end(self) -> list[int]:
        self.h.go.set()
        return list(await asyncio.gather(*self.tasks))


async def test_bulk_is_refused_first_then_normal_then_critical(held: Any) -> None:
    h, u = held
    async with (
        running_gateway(_prioritised(u)) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        c = Client(s, url(gw, ""), h)
        m = gw.runtime.metrics.registry.get_sample_value
        assert m("gateway_upstream_concurrency_limit", {"upstream": "api"}) == 10
        await c.hold("/bulk/a", 5)  # bulk: while under half the limit
        await c.refused("/bulk/a")
        await c.hold("/x", 4)  # normal: under the limit less critical's reserve (1)
        await c.refused("/x")
        await c.refused("/bulk/a")
        await c.hold("/crit/a", 1)  # critical: up to max_inflight
        await c.refused("/crit/a")
        await c.refused("/x")
        assert h.active == 10
        async with s.get(url(gw, "/livez")) as r:
            assert r.status == 200  # probes are never refused
        assert await c.end() == [200] * 10
        assert m("gateway_shed_total", {"route": "export", "priority": "bulk"}) == 2
        assert m("gateway_shed_total", {"route": "api", "priority": "normal"}) == 2
        assert m("gateway_shed_total", {"route": "login", "priority": "critical"}) == 1
        async with s.get(url(gw, "/bulk/a")) as r:
            assert r.status == 200  # all of it freed


async def test_without_a_critical_route_normal_uses_the_whole_fixed_limit(held: Any) -> None:
    h, u = held
    cfg = base_config(u, upstreams={"api": {"url": u, "max_inflight": 3}})
    async with (
        running_gateway(cfg) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        c = Client(s, url(gw, ""), h)
        await c.hold("/x", 3)
        body = await c.refused("/x")
        assert body["status"] == 503
        assert await c.end() == [200] * 3
        m = gw.runtime.metrics.registry.get_sample_value
        assert m("gateway_shed_total", {"route": "api", "priority": "normal"}) == 1


async def test_a_reload_that_changes_priorities_applies_to_the_next_request(held: Any) -> None:
    h, u = held
    cfg = _prioritised(u)
    async with (
        running_gateway(cfg) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        c = Client(s, url(gw, ""), h)
        await c.hold("/x", 5)
        await c.refused("/bulk/a")
        # export becomes normal, and no route is critical any more: no reserve
        cfg["routes"][0]["priority"] = "normal"
        cfg["routes"][1]["priority"] = "normal"
        gw.runtime.apply(load_text(yaml.safe_dump(cfg), environ={}))
        await c.hold("/bulk/a", 5)  # normal now, up to the whole limit (10)
        await c.refused("/crit/a")  # normal now: refused at the limit
        assert await c.end() == [200] * 10
        m = gw.runtime.metrics.registry.get_sample_value
        assert m("gateway_shed_total", {"route": "login", "priority": "normal"}) == 1


class Timed:
    """An upstream whose latency the test sets; with ``workers``, it works that many
    requests at once and queues the others (an application server's worker pool)."""

    def __init__(self) -> None:
        self.delay = 0.005
        self.pool: asyncio.Semaphore | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def workers(self, n: int, delay: float) -> None:
        self.pool = asyncio.Semaphore(n)
        self.delay = delay

    async def handle(self, request: web.Request) -> web.Response:
        if request.path != "/health":
            if self.pool is None:
                await asyncio.sleep(self.delay)
            else:
                async with self.pool:
                    await asyncio.sleep(self.delay)
        return web.Response(text="up")


async def test_the_adaptive_limit_falls_when_the_upstream_slows_and_recovers() -> None:
    t = Timed()
    async with serve(t.app) as u:
        cfg = base_config(
            u,
            upstreams={
                "api": {
                    "url": u,
                    "max_inflight": 20,
                    "concurrency": {"mode": "adaptive", "min": 2},
                }
            },
        )
        async with (
            running_gateway(cfg) as gw,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
        ):
            m = gw.runtime.metrics.registry.get_sample_value

            def limit() -> float:
                return m("gateway_upstream_concurrency_limit", {"upstream": "api"}) or 0.0

            assert limit() == 20  # the initial estimate (at most max_inflight)
            statuses: dict[int, int] = {}
            stop = asyncio.Event()

            async def flood() -> None:
                while not stop.is_set():
                    async with s.get(url(gw, "/x")) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 503:
                        await asyncio.sleep(0.01)

            t.workers(16, 0.02)  # as many workers as clients: no queue
            tasks = [asyncio.create_task(flood()) for _ in range(16)]
            try:
                # it goes (back) to the top once the probe at the start of the load (half
                # the limit for a moment) has measured the no-load latency
                assert await wait_for(lambda: limit() >= 15, timeout=10)
                # the upstream slows down: 4 workers, each twice as slow; the 16 clients
                # now queue inside it, and the limit falls to a few over 4
                t.workers(4, 0.04)
                assert await wait_for(lambda: limit() <= 8, timeout=20)
                t.workers(16, 0.02)  # and speeds up again
                assert await wait_for(lambda: limit() >= 15, timeout=20)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert statuses[200] > 0
            assert set(statuses) <= {200, 503}


async def test_explain_shows_the_limit_in_flight_and_the_would_be_verdict(held: Any) -> None:
    h, u = held
    env = {"GATEWAY_ADMIN_TOKEN": "t0ken-for-the-admin-port"}
    auth = {"Authorization": "Bearer t0ken-for-the-admin-port"}
    async with (
        running_gateway(_prioritised(u), env) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):

        async def explain(path: str) -> dict[str, Any]:
            params = {"ip": "10.1.2.3", "path": path, "method": "GET"}
            async with s.get(admin_url(gw, "/admin/explain"), params=params, headers=auth) as r:
                assert r.status == 200
                out: dict[str, Any] = await r.json()
                return out

        c = Client(s, url(gw, ""), h)
        await c.hold("/x", 5)
        bulk = await explain("/bulk/a")
        assert bulk["concurrency"] == {
            "mode": "fixed",
            "limit": 10,
            "max_inflight": 10,
            "inflight": 5,
            "critical_inflight": 0,
            "priority": "bulk",
            "would_refuse": True,
        }
        assert bulk["verdict"].startswith("503: ")
        normal = await explain("/x")
        assert normal["concurrency"]["would_refuse"] is False
        assert normal["verdict"] == "proxied to upstream 'api'"
        assert h.hits == 5, "explain sends nothing upstream"
        assert await c.end() == [200] * 5


async def test_a_concurrency_policy_refuses_the_keys_n_plus_first_and_frees_it(
    held: Any,
) -> None:
    h, u = held
    cfg = base_config(
        u,
        rate_limit={
            "policies": {
                "per-ip-inflight": {"max_inflight": 2, "key": "ip"},
                "per-ip": {"requests": 1000, "period_s": 1},
            }
        },
        routes=[
            {
                "name": "api",
                "path_prefix": "/",
                "upstream": "api",
                "rate_limits": ["per-ip", "per-ip-inflight"],
            }
        ],
    )
    async with (
        running_gateway(cfg) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        c = Client(s, url(gw, ""), h)
        await c.hold("/x", 2)
        hits = h.hits
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "1"
            assert r.headers["Content-Type"] == "application/problem+json"
            assert "RateLimit" not in r.headers
            assert "RateLimit-Policy" not in r.headers
        assert h.hits == hits
        # once they end, the key may have two in flight again
        h.go.set()
        assert await c.end() == [200, 200]
        h.go.clear()
        c.tasks = []
        await c.hold("/x", 2)
        assert len(gw.runtime.inflight_keys) == 1
        assert await c.end() == [200, 200]
        assert len(gw.runtime.inflight_keys) == 0  # nothing kept for an idle key
        m = gw.runtime.metrics.registry.get_sample_value
        assert (
            m(
                "gateway_ratelimit_decisions_total",
                {"policy": "per-ip-inflight", "decision": "limited"},
            )
            == 1
        )
        assert (
            m(
                "gateway_ratelimit_decisions_total",
                {"policy": "per-ip-inflight", "decision": "allowed"},
            )
            == 4
        )


class Echo:
    """An upstream with WebSockets on /ws (echo) and a plain answer elsewhere."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != "/ws":
            return web.Response(text="up")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
        return ws


async def _ws_open(s: aiohttp.ClientSession, gw: Any) -> Any:
    ws = await s.ws_connect(url(gw, "/ws"))
    await ws.send_str("hi")
    assert await ws.receive_str(timeout=5) == "echo:hi"
    return ws


async def _ws_refused(s: aiohttp.ClientSession, gw: Any) -> tuple[int, str]:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await s.ws_connect(url(gw, "/ws"))
    return err.value.status, err.value.headers.get("Content-Type", "") if err.value.headers else ""


async def test_an_open_websocket_counts_for_the_routes_concurrency_policy() -> None:
    """A socket is in flight while it is open: with max_inflight 1, an open WebSocket
    leaves its key no room for a request on the policy's routes, until it closes."""
    async with serve(Echo().handle) as u:
        cfg = base_config(
            u,
            rate_limit={"policies": {"one": {"max_inflight": 1, "key": "ip"}}},
            routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["one"]}],
        )
        async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
            ws = await _ws_open(s, gw)
            assert gw.runtime.inflight_keys.count("one", "127.0.0.1") == 1
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 429
                assert r.headers["Retry-After"] == "1"
            status, _ = await _ws_refused(s, gw)
            assert status == 429  # a second socket too
            await ws.close()
            assert await wait_for(lambda: len(gw.runtime.inflight_keys) == 0)
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 200
            m = gw.runtime.metrics.registry.get_sample_value
            limited = {"policy": "one", "decision": "limited"}
            assert m("gateway_ratelimit_decisions_total", limited) == 2


async def test_shed_total_counts_the_upstreams_websocket_cap_not_one_clients() -> None:
    """Both refusals are 503; the upstream's cap (max_connections) is load shed, like the
    limit's; one client past websocket.max_per_client is that client's excess."""
    async with serve(Echo().handle) as u:
        cfg = base_config(
            u,
            upstreams={"api": {"url": u, "max_connections": 1}},
            routes=[{"name": "chat", "path_prefix": "/", "upstream": "api", "priority": "bulk"}],
        )
        async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
            m = gw.runtime.metrics.registry.get_sample_value
            ws = await _ws_open(s, gw)
            assert await _ws_refused(s, gw) == (503, "application/problem+json")
            assert m("gateway_shed_total", {"route": "chat", "priority": "bulk"}) == 1
            await ws.close()
        cfg["upstreams"]["api"]["max_connections"] = 100
        cfg["websocket"] = {"max_per_client": 1}
        async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
            m = gw.runtime.metrics.registry.get_sample_value
            ws = await _ws_open(s, gw)
            assert await _ws_refused(s, gw) == (503, "application/problem+json")
            assert m("gateway_shed_total", {"route": "chat", "priority": "bulk"}) is None
            await ws.close()


def _adaptive(u: str, **concurrency: Any) -> dict[str, Any]:
    cfg = _prioritised(u, concurrency={"mode": "adaptive", "min": 2, **concurrency})
    cfg["upstreams"]["api"]["max_inflight"] = 40
    return cfg


async def _learn(gw: Any, s: aiohttp.ClientSession, t: Timed) -> int:
    """Load the upstream until its limit has left the initial figure; return it."""
    m = gw.runtime.metrics.registry.get_sample_value
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            async with s.get(url(gw, "/x")) as r:
                await r.read()

    tasks = [asyncio.create_task(flood()) for _ in range(12)]
    try:
        t.delay = 0.05  # slow: latency well over what was learned first
        await asyncio.sleep(0.3)
        t.delay = 0.01
        assert await wait_for(
            lambda: m("gateway_upstream_concurrency_limit", {"upstream": "api"}) not in (None, 20),
            timeout=20,
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return gw.runtime.upstreams["api"].limit  # type: ignore[no-any-return]


async def _reload(s: aiohttp.ClientSession, gw: Any, path: Any, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg))
    auth = {"Authorization": "Bearer t0ken-for-the-admin-port"}
    async with s.post(admin_url(gw, "/admin/reload"), headers=auth) as r:
        assert r.status == 200, await r.text()


async def test_a_reload_keeps_the_learned_limit_unless_the_upstreams_limits_change(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Priorities, the pool's settings: the learned limit is kept (the same figure, and
    still learning); mode, min or max_inflight: it starts again from the initial one."""
    t = Timed()
    env = {"GATEWAY_ADMIN_TOKEN": "t0ken-for-the-admin-port"}
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", env["GATEWAY_ADMIN_TOKEN"])  # read on reload
    path = tmp_path / "gateway.yaml"
    async with serve(t.app) as u:
        cfg = _adaptive(u)
        path.write_text(yaml.safe_dump(cfg))
        async with (
            running_gateway(cfg, env, path=str(path)) as gw,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
        ):
            learned = await _learn(gw, s, t)
            gradient = gw.runtime.upstreams["api"].gradient
            assert learned != 20
            cfg["routes"][0]["priority"] = "normal"  # priorities only
            await _reload(s, gw, path, cfg)
            assert gw.runtime.upstreams["api"].gradient is gradient
            cfg["upstreams"]["api"]["connect_timeout_s"] = 1.5  # rebuilds the pool
            await _reload(s, gw, path, cfg)
            assert gw.runtime.upstreams["api"].gradient is gradient
            m = gw.runtime.metrics.registry.get_sample_value
            limit = m("gateway_upstream_concurrency_limit", {"upstream": "api"})
            assert limit == gw.runtime.upstreams["api"].limit
            async with s.get(url(gw, "/x")) as r:
                assert r.status == 200
            cfg["upstreams"]["api"]["concurrency"]["min"] = 3  # the limit's own settings
            await _reload(s, gw, path, cfg)
            fresh = gw.runtime.upstreams["api"]
            assert fresh.gradient is not gradient
            assert fresh.limit == 20
            assert m("gateway_upstream_concurrency_limit", {"upstream": "api"}) == 20


async def test_a_reload_over_the_admin_port_that_changes_priorities(
    held: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the file and POST /admin/reload: bulk becomes critical, and a request of
    that route, refused before at half the limit, is admitted up to the cap after."""
    h, u = held
    env = {"GATEWAY_ADMIN_TOKEN": "t0ken-for-the-admin-port"}
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", env["GATEWAY_ADMIN_TOKEN"])  # read on reload
    path = tmp_path / "gateway.yaml"
    cfg = _prioritised(u)
    path.write_text(yaml.safe_dump(cfg))
    async with (
        running_gateway(cfg, env, path=str(path)) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):
        c = Client(s, url(gw, ""), h)
        await c.hold("/x", 9)  # normal: up to the limit less critical's reserve
        await c.refused("/bulk/a")
        cfg["routes"][1]["priority"] = "critical"
        await _reload(s, gw, path, cfg)
        await c.hold("/bulk/a", 1)  # critical now: up to max_inflight
        await c.refused("/bulk/a")  # the cap binds it too
        assert await c.end() == [200] * 10
        m = gw.runtime.metrics.registry.get_sample_value
        assert m("gateway_shed_total", {"route": "export", "priority": "bulk"}) == 1
        assert m("gateway_shed_total", {"route": "export", "priority": "critical"}) == 1


async def test_explain_shows_each_concurrency_policy_its_key_count_and_verdict(
    held: Any,
) -> None:
    h, u = held
    env = {"GATEWAY_ADMIN_TOKEN": "t0ken-for-the-admin-port"}
    auth = {"Authorization": "Bearer t0ken-for-the-admin-port"}
    cfg = base_config(
        u,
        rate_limit={
            "policies": {
                "per-ip-inflight": {"max_inflight": 2, "key": "ip"},
                "per-route-inflight": {"max_inflight": 50, "key": "route", "mode": "shadow"},
            }
        },
        routes=[
            {
                "name": "api",
                "path_prefix": "/",
                "upstream": "api",
                "rate_limits": ["per-ip-inflight", "per-route-inflight"],
            }
        ],
    )
    async with (
        running_gateway(cfg, env) as gw,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s,
    ):

        async def explain(ip: str) -> dict[str, Any]:
            params = {"ip": ip, "path": "/x", "method": "GET"}
            async with s.get(admin_url(gw, "/admin/explain"), params=params, headers=auth) as r:
                assert r.status == 200
                out: dict[str, Any] = await r.json()
                return out

        c = Client(s, url(gw, ""), h)
        await c.hold("/x", 2)
        mine = await explain("127.0.0.1")
        assert mine["concurrency_policies"] == [
            {
                "policy": "per-ip-inflight",
                "key": "127.0.0.1",
                "mode": "enforce",
                "max_inflight": 2,
                "inflight": 2,
                "would_refuse": True,
                "exempt": False,
            },
            {
                "policy": "per-route-inflight",
                "key": "route:api",
                "mode": "shadow",
                "max_inflight": 50,
                "inflight": 2,
                "would_refuse": False,
                "exempt": False,
            },
        ]
        assert mine["verdict"] == "429: too many requests in flight: per-ip-inflight"
        other = await explain("10.9.8.7")
        assert other["concurrency_policies"][0]["inflight"] == 0
        assert other["concurrency_policies"][0]["would_refuse"] is False
        assert other["verdict"] == "proxied to upstream 'api'"
        async with s.get(url(gw, "/x")) as r:  # the pipeline agrees
            assert r.status == 429
        assert h.hits == 2, "explain sends nothing upstream"
        assert await c.end() == [200, 200]
