"""Probe endpoints served from a real HealthMonitor over real sockets."""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.config import load_text
from gateway.core.health import Status
from gateway.health.monitor import HealthMonitor
from gateway.health.probes import probe_response
from gateway.metrics import Metrics
from tests.conftest import free_port
from tests.gw import admin_url, base_config, running_gateway, serve, url, wait_for

pytestmark = pytest.mark.timeout(30)

TEXT = "text/plain; charset=utf-8"


@pytest.fixture(autouse=True)
def fast_lag_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HealthMonitor, "LOOP_TICK_S", 0.05)


class SwitchableHealth:
    def __init__(self) -> None:
        self.status = 200
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=self.status)


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _port(server: TestServer) -> int:
    assert server.port is not None
    return server.port


class Env:
    """api (critical) and bot (not critical) upstreams, a database with no DSN set
    (unhealthy, not critical), the monitor, and a client of the probe app."""

    def __init__(
        self,
        api: SwitchableHealth,
        bot: SwitchableHealth,
        monitor: HealthMonitor,
        client: TestClient[web.Request, web.Application],
    ) -> None:
        self.api, self.bot, self.monitor, self.client = api, bot, monitor, client

    async def start(self) -> None:
        await self.monitor.start()
        await wait_until(lambda: self.monitor.started)

    def status_of(self, name: str) -> Status:
        return self.monitor.components()[name].status

    async def get(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        async with self.client.get(path, **kw) as resp:
            assert resp.headers["Cache-Control"] == "no-store"
            return resp.status, await resp.text(), resp.headers

    async def json(self, path: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        async with self.client.get(path, **kw) as resp:
            assert resp.headers["Content-Type"] == "application/json"
            assert resp.headers["Cache-Control"] == "no-store"
            return resp.status, orjson.loads(await resp.read())


@pytest.fixture
async def env(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient) -> AsyncIterator[Env]:
    api, bot = SwitchableHealth(), SwitchableHealth()
    api_server, bot_server = await aiohttp_server(api.app), await aiohttp_server(bot.app)
    hc = "interval_s: 0.1, timeout_s: 0.5, healthy_threshold: 1, unhealthy_threshold: 1"
    yaml_text = f"""
        upstreams:
          api: {{url: "http://127.0.0.1:{_port(api_server)}", health: {{{hc}}}}}
          bot: {{url: "http://127.0.0.1:{_port(bot_server)}", health: {{{hc}, critical: false}}}}
        database: {{interval_s: 0.1}}
    """
    settings = load_text(textwrap.dedent(yaml_text), environ={})
    monitor = HealthMonitor(settings, metrics=Metrics())

    async def handler(request: web.Request) -> web.StreamResponse:
        response = await probe_response(request, monitor)
        if response is None:
            return web.Response(status=404, text="not a probe")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    client = await aiohttp_client(app)
    try:
        yield Env(api, bot, monitor, client)
    finally:
        await monitor.close()


READY_VERBOSE = """\
[+]upstream:api ok
[+]upstream:bot ok
[+]database unhealthy: GATEWAY_DATABASE_URL not set (not critical)
[+]event_loop ok
[+]shutdown ok
readyz check passed
"""


async def test_startupz_before_and_after_the_first_round(env: Env) -> None:
    status, text, headers = await env.get("/startupz")
    assert status == 503
    assert headers["Content-Type"] == TEXT
    assert text == (
        "[-]upstream:api failed: not checked yet\n"
        "[-]upstream:bot failed: not checked yet\n"
        "[-]database failed: not checked yet\n"
        "[-]event_loop failed: not checked yet\n"
        "startupz check failed\n"
    )
    assert (await env.get("/readyz"))[0] == 503  # nothing checked: not ready either
    assert (await env.get("/livez"))[:2] == (200, "ok\n")  # but alive

    await env.start()
    assert (await env.get("/startupz"))[:2] == (200, "ok\n")
    status, text, _ = await env.get("/startupz?verbose")
    assert text.splitlines()[0] == "[+]upstream:api ok"
    assert text.endswith("startupz check passed\n")


async def test_readyz_and_verbose(env: Env) -> None:
    await env.start()
    status, text, headers = await env.get("/readyz")
    assert (status, text, headers["Content-Type"]) == (200, "ok\n", TEXT)
    assert (await env.get("/readyz?verbose"))[:2] == (200, READY_VERBOSE)
    assert (await env.get("/readyz?verbose=1"))[:2] == (200, READY_VERBOSE)
    assert (await env.get("/readyz?verbose=false"))[:2] == (200, "ok\n")


async def test_healthz_counts_every_component(env: Env) -> None:
    await env.start()
    status, text, _ = await env.get("/healthz")
    assert status == 503  # the (non-critical) database is unhealthy
    assert text == "[-]database failed: GATEWAY_DATABASE_URL not set\nhealthz check failed\n"
    assert (await env.get("/healthz?exclude=database"))[:2] == (200, "ok\n")
    status, text, _ = await env.get("/healthz?exclude=database&verbose")
    assert status == 200
    assert text == (
        "[+]upstream:api ok\n"
        "[+]upstream:bot ok\n"
        "[+]event_loop ok\n"
        "[+]database excluded: ok\n"
        "healthz check passed\n"
    )


async def test_critical_upstream_down(env: Env) -> None:
    await env.start()
    env.api.status = 503
    await wait_until(lambda: env.status_of("upstream:api") is Status.UNHEALTHY)

    status, text, _ = await env.get("/readyz")
    assert status == 503
    assert text == "[-]upstream:api failed: HTTP 503\nreadyz check failed\n"
    assert (await env.get("/livez"))[:2] == (200, "ok\n")  # dependencies never count
    assert (await env.get("/startupz"))[0] == 200
    assert (await env.get("/readyz?exclude=upstream:api"))[0] == 200
    status, text, _ = await env.get("/readyz/upstream:api")
    assert (status, text) == (503, "[-]upstream:api failed: HTTP 503\nreadyz check failed\n")
    assert (await env.get("/readyz/upstream:bot"))[:2] == (200, "ok\n")

    env.api.status = 200
    await wait_until(lambda: env.status_of("upstream:api") is Status.HEALTHY)
    assert (await env.get("/readyz"))[0] == 200


async def test_non_critical_upstream_down(env: Env) -> None:
    await env.start()
    env.bot.status = 500
    await wait_until(lambda: env.status_of("upstream:bot") is Status.UNHEALTHY)
    status, text, _ = await env.get("/readyz?verbose")
    assert status == 200
    assert "[+]upstream:bot unhealthy: HTTP 500 (not critical)\n" in text
    assert (await env.get("/readyz/upstream:bot"))[0] == 503  # asked for by name
    status, text, _ = await env.get("/healthz?exclude=database")
    assert (status, text) == (503, "[-]upstream:bot failed: HTTP 500\nhealthz check failed\n")


async def test_draining(env: Env) -> None:
    await env.start()
    env.monitor.draining = True
    status, text, _ = await env.get("/readyz")
    assert (status, text) == (503, "[-]shutdown failed: draining\nreadyz check failed\n")
    status, text, _ = await env.get("/readyz?verbose")
    assert status == 503
    assert text.endswith("[-]shutdown failed: draining\nreadyz check failed\n")
    status, body = await env.json("/readyz?format=json")
    assert (status, body["draining"], body["passed"]) == (503, True, False)
    assert (await env.get("/livez"))[0] == 200
    assert (await env.get("/healthz?exclude=database"))[0] == 200
    assert (await env.get("/readyz/upstream:api"))[0] == 200  # one component: its own status
    env.monitor.draining = False
    assert (await env.get("/readyz"))[0] == 200


async def test_json(env: Env) -> None:
    await env.start()
    status, body = await env.json("/readyz?format=json")
    assert status == 200
    assert set(body) == {"status", "passed", "draining", "components"}
    assert (body["status"], body["passed"], body["draining"]) == ("unhealthy", True, False)
    assert list(body["components"]) == ["upstream:api", "upstream:bot", "database", "event_loop"]
    api = body["components"]["upstream:api"]
    assert {"status", "critical", "latency_ms", "message", "last_checked"} <= set(api)
    assert (api["status"], api["critical"], api["message"]) == ("healthy", True, "HTTP 200")
    assert api["latency_ms"] > 0
    assert abs(api["last_checked"] - time.time()) < 5
    db = body["components"]["database"]
    assert (db["status"], db["critical"], db["latency_ms"]) == ("unhealthy", False, None)
    assert db["message"] == "GATEWAY_DATABASE_URL not set"

    status, body = await env.json("/readyz", headers={"Accept": "application/json"})
    assert status == 200
    assert "components" in body

    status, body = await env.json("/healthz?format=json&exclude=database,event_loop")
    assert (status, body["status"], body["passed"]) == (200, "healthy", True)
    assert list(body["components"]) == ["upstream:api", "upstream:bot"]

    status, body = await env.json("/healthz?format=json")
    assert (status, body["status"], body["passed"]) == (503, "unhealthy", False)

    status, body = await env.json("/livez?format=json")
    assert (status, body["status"]) == (200, "healthy")
    assert list(body["components"]) == ["event_loop"]

    status, body = await env.json("/readyz/database?format=json")
    assert (status, list(body["components"])) == (503, ["database"])

    # an explicit format wins over Accept
    status, text, headers = await env.get(
        "/readyz?format=text", headers={"Accept": "application/json"}
    )
    assert (status, text, headers["Content-Type"]) == (200, "ok\n", TEXT)


async def test_single_component(env: Env) -> None:
    await env.start()
    assert (await env.get("/readyz/upstream:api"))[:2] == (200, "ok\n")
    status, text, _ = await env.get("/readyz/database?verbose")
    assert (status, text) == (
        503,
        "[-]database failed: GATEWAY_DATABASE_URL not set\nreadyz check failed\n",
    )
    assert (await env.get("/healthz/upstream:bot"))[0] == 200
    assert (await env.get("/livez/event_loop"))[0] == 200
    assert (await env.get("/startupz/database"))[0] == 200  # checked (and unhealthy)

    for path in ("/readyz/nope", "/livez/database", "/healthz/upstream:nope"):
        async with env.client.get(path) as resp:
            assert resp.status == 404, path
            assert resp.headers["Content-Type"] == "application/problem+json"
            problem = await resp.json(content_type=None)
            assert problem["status"] == 404
            assert problem["title"] == "Not Found"


async def test_not_probes_and_methods(env: Env) -> None:
    await env.start()
    for path in ("/", "/readyzz", "/api/readyz", "/ready", "/metrics"):
        async with env.client.get(path) as resp:
            assert (resp.status, await resp.text()) == (404, "not a probe"), path

    async with env.client.post("/readyz") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
        assert resp.headers["Content-Type"] == "application/problem+json"

    async with env.client.head("/readyz") as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        assert await resp.read() == b""


async def test_livez_fails_on_a_blocked_loop(aiohttp_server: AiohttpServer) -> None:
    up = SwitchableHealth()
    server = await aiohttp_server(up.app)
    settings = load_text(
        f"upstreams: {{api: {{url: 'http://127.0.0.1:{_port(server)}'}}}}\n"
        "liveness: {max_event_loop_lag_s: 0.2}\n",
        environ={},
    )
    monitor = HealthMonitor(settings, metrics=Metrics())
    await monitor.start()
    try:
        await wait_until(lambda: monitor.started)
        time.sleep(0.3)  # the event loop is blocked
        response = await probe_response(make_mocked_request("GET", "/livez"), monitor)
        assert response is not None
        assert response.status == 503
        assert isinstance(response.body, bytes)
        lines = response.body.decode().splitlines()
        assert lines[0].startswith("[-]event_loop failed: event loop lag 0.")
        assert lines[0].endswith("s over the limit of 0.2s")
        assert lines[1] == "livez check failed"
        await wait_until(lambda: monitor.live()[0])
        response = await probe_response(make_mocked_request("GET", "/livez"), monitor)
        assert response is not None
        assert response.status == 200
    finally:
        await monitor.close()


async def test_probe_work_is_well_under_a_millisecond(env: Env) -> None:
    await env.start()
    for path in ("/livez", "/startupz", "/readyz?verbose", "/healthz?format=json"):
        requests = [make_mocked_request("GET", path) for _ in range(200)]
        t0 = time.perf_counter()
        for request in requests:
            response = await probe_response(request, env.monitor)
            assert response is not None
        per_call = (time.perf_counter() - t0) / len(requests)
        assert per_call < 0.001, (path, per_call)


# --------------------------------------------------------------------------- the proxy port
# Probes there answer the internet: names, statuses and `critical` only (SPEC section 9).

PUBLIC_PROBES = [
    "/healthz",
    "/healthz?verbose",
    "/healthz?verbose&format=json",
    "/healthz?format=json&verbose=1",
    "/readyz?verbose",
    "/readyz?format=json",
    "/readyz/upstream:down",
    "/readyz/upstream:down?verbose",
    "/readyz/upstream:down?format=json",
    "/readyz/database?verbose",
    "/readyz/database:rows?format=json",
    "/startupz?verbose&format=json",
    "/livez?verbose",
    "/livez?format=json",
]
# what a failing check's message, details or timing would show
INTERNALS = ("127.0.0.1", "http://", "postgresql", "connect", "refused", "not set", "latency",
             "last_checked", "message", "details", "lag", "HTTP 200", "SELECT")  # fmt: skip


@pytest.fixture
async def probed() -> AsyncIterator[tuple[str, str, int]]:
    """A gateway with a healthy upstream, one refusing connections on an internal
    address, and a database whose server is not there; yields its two base URLs."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    down_port = free_port()
    async with serve(ok) as up:
        cfg = base_config(
            up,
            upstreams={
                "api": {"url": up, "health": {"interval_s": 0.2}},
                "down": {
                    "url": f"http://127.0.0.1:{down_port}",
                    "health": {"interval_s": 0.2, "critical": False},
                },
            },
            database={
                "interval_s": 0.2,
                "timeout_s": 0.5,
                "checks": [{"name": "rows", "query": "SELECT 1"}],
            },
        )
        env = {"GATEWAY_DATABASE_URL": f"postgresql://gw:s3cret@127.0.0.1:{free_port()}/app"}
        async with running_gateway(cfg, env) as gw:
            comps = gw.runtime.monitor.components

            def checked() -> bool:
                return gw.runtime.monitor.started and all(
                    c.last_checked is not None for c in comps().values()
                )

            assert await wait_for(checked)
            assert comps()["upstream:down"].status is Status.UNHEALTHY
            yield url(gw, ""), admin_url(gw, ""), down_port


@pytest.mark.parametrize("target", PUBLIC_PROBES)
async def test_probes_on_the_proxy_port_show_names_and_statuses_only(
    probed: tuple[str, str, int], target: str
) -> None:
    proxy, admin, down_port = probed
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy + target) as resp:
            public = await resp.read()
            public_status = resp.status
            json_wanted = "format=json" in target
            assert resp.content_type == ("application/json" if json_wanted else "text/plain")
        async with s.get(admin + target) as resp:
            full = await resp.read()
            assert resp.status == public_status  # the same verdict on both ports
    text = public.decode()
    for word in (*INTERNALS, str(down_port)):
        assert word not in text, (word, text)
    if json_wanted:
        body = orjson.loads(public)
        assert set(body) == {"status", "passed", "draining", "components"}
        for name, comp in body["components"].items():
            assert set(comp) == {"status", "critical"}, name
            assert comp["status"] in {"healthy", "degraded", "unhealthy"}
    # the admin port keeps the detail
    if "down" in target or target.startswith("/healthz?"):
        assert f"127.0.0.1:{down_port}".encode() in full or b"connect" in full, full


async def test_accept_json_on_the_proxy_port_is_redacted_too(probed: tuple[str, str, int]) -> None:
    proxy, _, down_port = probed
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy + "/healthz", headers={"Accept": "application/json"}) as resp,
    ):
        body = orjson.loads(await resp.read())
    assert resp.status == 503
    assert body["components"]["upstream:down"] == {"status": "unhealthy", "critical": False}
    assert body["components"]["upstream:api"] == {"status": "healthy", "critical": True}
    assert str(down_port) not in orjson.dumps(body).decode()
