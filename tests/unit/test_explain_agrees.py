"""/admin/explain and the pipeline decide alike: the same requests, fed to both, get the
same verdict (the decisions live in one place, gateway.pipeline.decisions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from multidict import CIMultiDict

from gateway.admin.explain import explain_request
from gateway.core.client_ip import parse_ip
from gateway.pipeline.context import Ctx
from gateway.pipeline.handler import ProxyHandler
from gateway.pipeline.reject import Reject
from tests.unit.pipeline_fakes import FakeRequest, runtime_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.runtime import Runtime

SECRET = "s3cret-value"
CONFIG: dict[str, Any] = {
    "allowed_hosts": ["example.com"],
    "deny_cidrs": ["192.0.2.0/24"],
    "request": {
        "max_body_bytes": 1000,
        "max_header_bytes": 2048,
        "headers_with_underscores": "reject",
    },
    "rate_limit": {
        "policies": {
            "per-key": {"requests": 100, "period_s": 60, "key": "header:X-Api-Key"},
            "tight": {"requests": 1, "period_s": 3600},
        }
    },
    "routes": [
        {
            "name": "admin",
            "path_prefix": "/admin/",
            "upstream": "api",
            "methods": ["GET"],
            "source_cidrs": ["10.0.0.0/8"],
            "shared_secret": {"header": "X-Admin-Secret", "value_env": "ADMIN_SECRET"},
        },
        {"name": "keyed", "path_prefix": "/keyed/", "upstream": "api", "rate_limits": ["per-key"]},
        {"name": "tight", "path_prefix": "/tight/", "upstream": "api", "rate_limits": ["tight"]},
        {"name": "api", "path_prefix": "/api/", "upstream": "api"},
    ],
}
HOST = ("Host", "example.com")
GOOD = ("X-Admin-Secret", SECRET)

# (method, target, header fields, peer address, the status expected; None: proxied)
CASES: list[Any] = [
    pytest.param("GET", "/api/x", [HOST], "10.1.2.3", None, id="plain"),
    pytest.param("GET", "/API/x", [HOST], "10.1.2.3", None, id="letter-case"),
    pytest.param("GET", "/api/x", [("Host", "other.org")], "10.1.2.3", 400, id="other-host"),
    pytest.param("GET", "/api/x", [("Host", "EXAMPLE.com:80")], "10.1.2.3", None, id="host-case"),
    pytest.param("GET", "/api/x", [], "10.1.2.3", 400, id="no-host"),
    pytest.param("GET", "/api/x", [HOST], "192.0.2.9", 403, id="denied"),
    pytest.param("GET", "/nothing", [HOST], "10.1.2.3", 404, id="no-route"),
    pytest.param("TRACE", "/api/x", [HOST], "10.1.2.3", 405, id="trace"),
    pytest.param("CONNECT", "/api/x", [HOST], "10.1.2.3", 405, id="connect"),
    pytest.param("GET", "/admin/x", [HOST, GOOD], "10.1.2.3", None, id="admin-ok"),
    pytest.param("POST", "/admin/x", [HOST, GOOD], "10.1.2.3", 405, id="admin-method"),
    pytest.param("GET", "/admin/x", [HOST, GOOD], "172.16.0.1", 403, id="admin-source"),
    pytest.param("GET", "/admin/x", [HOST], "10.1.2.3", 403, id="admin-no-secret"),
    pytest.param(
        "GET", "/admin/x", [HOST, ("X-Admin-Secret", "nope")], "10.1.2.3", 403, id="admin-wrong"
    ),
    pytest.param("GET", "/api/../admin/x", [HOST], "10.1.2.3", 403, id="dot-segments-guarded"),
    pytest.param("GET", "/api/%2e%2e/admin/x", [HOST], "10.1.2.3", 403, id="encoded-dots"),
    pytest.param("GET", "/api;x=1/..;/admin/x", [HOST], "10.1.2.3", 403, id="path-params"),
    pytest.param("GET", "//h/admin/x", [HOST], "10.1.2.3", 400, id="leading-slashes"),
    pytest.param("GET", "/api/%zz", [HOST], "10.1.2.3", 400, id="bad-encoding"),
    pytest.param(
        "POST", "/api/x", [HOST, ("Content-Length", "5000")], "10.1.2.3", 413, id="too-large"
    ),
    pytest.param("POST", "/api/x", [HOST, ("Content-Length", "10")], "10.1.2.3", None, id="small"),
    pytest.param(
        "GET", "/api/x", [HOST, ("X_Forwarded_For", "1.2.3.4")], "10.1.2.3", 400, id="underscore"
    ),
    pytest.param("GET", "/api/x", [HOST, ("X-Big", "v" * 3000)], "10.1.2.3", 431, id="head-size"),
    pytest.param("GET", "/keyed/x", [HOST, ("X-Api-Key", "k1")], "10.1.2.3", None, id="key-one"),
    pytest.param(
        "GET",
        "/keyed/x",
        [HOST, ("X-Api-Key", "k1"), ("X-Api-Key", "k2")],
        "10.1.2.3",
        400,
        id="key-twice",
    ),
    pytest.param("GET", "/keyed/x", [HOST], "2001:db8::1", None, id="ipv6"),
    pytest.param("GET", "/api/x", [("Host", "other.org")], "192.0.2.9", 403, id="denied-first"),
]


@pytest.fixture
async def rt() -> AsyncIterator[Runtime]:
    runtime = runtime_of(CONFIG, {"ADMIN_SECRET": SECRET})
    yield runtime
    await runtime.close()


async def handler_says(handler: ProxyHandler, request: FakeRequest) -> str:
    snap = handler.rt.snapshot
    ctx = Ctx(0.0)
    handler.identify(request, snap, ctx)
    try:
        up, _ = await handler.admit(request, snap, ctx)
    except Reject as rej:
        return f"{rej.status}: {rej.detail}"
    return f"proxied to upstream {up.name!r}"


async def explain_says(rt: Runtime, request: FakeRequest, peer: str) -> str:
    ip = parse_ip(peer)
    assert ip is not None
    doc = await explain_request(
        rt, ip, request.raw_path, request.method, CIMultiDict(request.headers)
    )
    verdict: str = doc["verdict"]
    return verdict


@pytest.mark.parametrize(("method", "target", "headers", "peer", "status"), CASES)
async def test_explain_and_the_handler_agree(  # noqa: PLR0917 - a column of the table each
    rt: Runtime,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    peer: str,
    status: int | None,
) -> None:
    handler = ProxyHandler(rt)
    request = FakeRequest(method, target, headers, peer=peer)
    explained = await explain_says(rt, request, peer)
    decided = await handler_says(handler, request)
    assert explained == decided
    if status is None:
        assert decided.startswith("proxied")
    else:
        assert decided.startswith(f"{status}: ")


async def test_a_spent_budget_is_a_429_to_both(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    first = FakeRequest("GET", "/tight/x")
    assert (await handler_says(handler, first)).startswith("proxied")
    again = FakeRequest("GET", "/tight/x")
    explained = await explain_says(rt, again, "10.1.2.3")
    assert explained == await handler_says(handler, again)
    assert explained.startswith("429: ")
