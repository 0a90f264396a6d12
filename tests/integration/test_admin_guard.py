"""Guessing the admin token is bounded: a budget of failed admin authentications per
client address, over real sockets (SPEC section 5)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from structlog.testing import capture_logs

from gateway.admin.guard import FAILURE_RATE
from gateway.app import Gateway
from tests.gw import admin_url, base_config, running_gateway, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "gu4rd-admin-token-long-enough-7c1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = {"Authorization": "Bearer not-the-token"}
ENV = {"GATEWAY_ADMIN_TOKEN": TOKEN}
BUDGET = FAILURE_RATE.burst

# every admin endpoint that takes the token: a guess at any of them spends the budget
GUARDED = (
    ("GET", "/admin/stats"),
    ("GET", "/admin/bans"),
    ("GET", "/admin/allow"),
    ("GET", "/admin/explain?ip=10.1.2.3&path=/x"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/config"),
    ("DELETE", "/admin/bans/10.1.2.3"),
    ("POST", "/admin/allow"),
    ("DELETE", "/admin/allow/10.1.2.3"),
)


@pytest.fixture
async def up_url() -> AsyncIterator[str]:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with serve(ok) as u:
        yield u


@pytest.fixture
async def gw(up_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(base_config(up_url), ENV) as g:
        yield g


def _client(source: str) -> aiohttp.ClientSession:
    """A session whose connections come from ``source`` (a loopback address)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def _status(
    s: aiohttp.ClientSession, gw: Gateway, method: str, path: str, headers: dict[str, str] | None
) -> tuple[int, CIMultiDict[str], bytes]:
    async with s.request(method, admin_url(gw, path), headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def _spend_budget(s: aiohttp.ClientSession, gw: Gateway) -> None:
    """BUDGET failed authentications, wrong and missing tokens over every endpoint."""
    for n in range(BUDGET):
        method, path = GUARDED[n % len(GUARDED)]
        status, _, _ = await _status(s, gw, method, path, WRONG if n % 2 else None)
        assert status == 401, (n, method, path)


def _failures(gw: Gateway, result: str) -> float:
    value = gw.runtime.metrics.registry.get_sample_value(
        "gateway_admin_auth_failures_total", {"result": result}
    )
    return value or 0.0


async def test_past_the_budget_an_address_is_refused_even_with_the_right_token(
    gw: Gateway,
) -> None:
    async with _client("127.0.0.1") as s:
        await _spend_budget(s, gw)
        for method, path in GUARDED:
            for headers in (WRONG, None, AUTH):
                status, hdrs, body = await _status(s, gw, method, path, headers)
                assert status == 429, (method, path, headers)
                assert hdrs["Content-Type"] == "application/problem+json"
                problem = orjson.loads(body)
                assert problem["status"] == 429
                assert "admin" in problem["detail"]
                retry = int(hdrs["Retry-After"])
                assert 1 <= retry <= FAILURE_RATE.emission_s + 1
        # probes, metrics and the operator page's files are never refused by it
        for path in ("/livez", "/readyz", "/startupz", "/healthz", "/metrics", "/admin/ui"):
            for headers in (None, WRONG):
                status, _, _ = await _status(s, gw, "GET", path, headers)
                # the probes answer for the checks (a first round may still be running)
                assert status == 200 or (status == 503 and path != "/livez"), path
    # the right token from another address still works
    async with _client("127.0.0.2") as other:
        for method, path in (("GET", "/admin/stats"), ("GET", "/admin/bans")):
            status, _, _ = await _status(other, gw, method, path, AUTH)
            assert status == 200, path
    assert _failures(gw, "unauthorized") == BUDGET
    assert _failures(gw, "throttled") == 3 * len(GUARDED)


async def test_the_budget_refills_and_each_refill_buys_one_more_guess(gw: Gateway) -> None:
    async with _client("127.0.0.3") as s:
        await _spend_budget(s, gw)
        status, hdrs, _ = await _status(s, gw, "GET", "/admin/stats", AUTH)
        assert status == 429
        await asyncio.sleep(float(hdrs["Retry-After"]) + 0.05)
        status, _, _ = await _status(s, gw, "GET", "/admin/stats", AUTH)
        assert status == 200  # refilled by one: the right token works again
        status, _, _ = await _status(s, gw, "GET", "/admin/stats", WRONG)
        assert status == 401  # that one failure is spent again...
        status, _, _ = await _status(s, gw, "GET", "/admin/stats", AUTH)
        assert status == 429  # ...so the address waits once more


async def test_the_right_token_costs_nothing(gw: Gateway) -> None:
    async with _client("127.0.0.4") as s:
        for _ in range(3 * BUDGET):
            status, _, _ = await _status(s, gw, "GET", "/admin/bans", AUTH)
            assert status == 200
        # and the failures are all still there to spend
        await _spend_budget(s, gw)
        status, _, _ = await _status(s, gw, "GET", "/admin/bans", AUTH)
        assert status == 429


async def test_one_log_line_when_an_address_runs_out_not_one_a_refusal(gw: Gateway) -> None:
    with capture_logs() as logs:
        async with _client("127.0.0.5") as s:
            await _spend_budget(s, gw)
            for _ in range(20):
                status, _, _ = await _status(s, gw, "GET", "/admin/stats", WRONG)
                assert status == 429
    events = [e for e in logs if e["event"] == "admin_auth_throttled"]
    assert len(events) == 1, events
    assert events[0]["client_ip"] == "127.0.0.5"
    assert events[0]["failures"] == BUDGET
    assert events[0]["retry_after_s"] > 0


async def test_the_metric_names_no_address(gw: Gateway) -> None:
    async with _client("127.0.0.6") as s:
        await _spend_budget(s, gw)
        await _status(s, gw, "GET", "/admin/stats", AUTH)
        status, _, body = await _status(s, gw, "GET", "/metrics", None)
    assert status == 200
    lines = [ln for ln in body.decode().splitlines() if "admin_auth_failures" in ln]
    assert any(ln.startswith("gateway_admin_auth_failures_total") for ln in lines)
    assert not any("127.0.0" in ln for ln in lines)


async def test_with_no_token_configured_the_api_stays_403_not_429(up_url: str) -> None:
    async with running_gateway(base_config(up_url), {}) as g, _client("127.0.0.7") as s:
        for _ in range(3 * BUDGET):
            status, _, _ = await _status(s, g, "GET", "/admin/stats", WRONG)
            assert status == 403
    assert _failures(g, "unauthorized") == 0
