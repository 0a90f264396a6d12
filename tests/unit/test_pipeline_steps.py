"""The pipeline's steps, driven without sockets: a fake request satisfying
PipelineRequest and a runtime built from a config."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from gateway.core.concurrency import Priority, admits, critical_reserve
from gateway.downstream.messages import Response
from gateway.pipeline.context import Ctx
from gateway.pipeline.handler import ProxyHandler
from gateway.pipeline.reject import Reject
from gateway.pipeline.upstream_leg import upstream_fields
from tests.unit.pipeline_fakes import FakeRequest, runtime_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.runtime import Runtime

CONFIG: dict[str, Any] = {
    "trusted_proxies": ["10.9.0.0/16"],
    "request": {"max_body_bytes": 1000},
    "rate_limit": {
        "ipv6_prefix": 64,
        "policies": {"per-ip": {"requests": 5, "period_s": 60}},
    },
    "routes": [
        {
            "name": "limited",
            "path_prefix": "/limited/",
            "upstream": "api",
            "rate_limits": ["per-ip"],
        },
        {"name": "api", "path_prefix": "/api/", "upstream": "api"},
    ],
}


@pytest.fixture
async def rt() -> AsyncIterator[Runtime]:
    runtime = runtime_of(CONFIG)
    yield runtime
    await runtime.close()


def _identified(rt: Runtime, request: FakeRequest) -> tuple[Ctx, bool]:
    ctx = Ctx(0.0)
    via_proxy = ProxyHandler(rt).identify(request, rt.snapshot, ctx)
    return ctx, via_proxy


async def test_request_ids_are_a_prefix_and_a_counter_in_16_hex_digits(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    rids = []
    for _ in range(600):  # across the counter's 256 and 512 boundaries
        ctx = Ctx(0.0)
        handler.identify(FakeRequest(), rt.snapshot, ctx)
        rids.append(ctx.rid)
    prefix = rids[0][:16]
    assert rids == [prefix + "%016x" % n for n in range(600)]  # noqa: UP031
    assert len(set(rids)) == 600
    # a valid request id of the client's is kept
    ctx = Ctx(0.0)
    handler.identify(FakeRequest(headers=[("X-Request-Id", "abc-123")]), rt.snapshot, ctx)
    assert ctx.rid == "abc-123"


async def test_identify_a_direct_client(rt: Runtime) -> None:
    request = FakeRequest(headers=[("X-Forwarded-For", "1.2.3.4")], peer="10.1.2.3")
    ctx, via_proxy = _identified(rt, request)
    assert not via_proxy  # the peer is not a trusted proxy: its X-Forwarded-For is not believed
    assert (ctx.client_ip, ctx.ban_key) == ("10.1.2.3", "10.1.2.3")
    assert ctx.rid
    assert request.rid == ctx.rid
    assert request.response_headers is rt.snapshot.response_headers
    assert not request.https


async def test_identify_through_a_trusted_proxy(rt: Runtime) -> None:
    request = FakeRequest(
        headers=[
            ("X-Forwarded-For", "7.7.7.7, 1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Request-ID", "given-id.1"),
        ],
        peer="10.9.1.1",
    )
    ctx, via_proxy = _identified(rt, request)
    assert via_proxy
    assert ctx.client_ip == "1.2.3.4"  # the right-most address a trusted hop vouched for
    assert request.https
    assert ctx.rid == "given-id.1"


async def test_identify_keys_an_ipv6_client_by_its_prefix(rt: Runtime) -> None:
    ctx, _ = _identified(rt, FakeRequest(peer="2001:db8:1:2:3:4:5:6"))
    assert ctx.client_ip == "2001:db8:1:2:3:4:5:6"
    assert ctx.ban_key == "2001:db8:1:2::/64"


async def test_a_refusal_is_one_problem_answer(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    request = FakeRequest("GET", "/nowhere")
    resp = await handler(request)
    assert isinstance(resp, Response)
    assert resp.status == 404
    assert resp.body is not None
    doc = json.loads(resp.body)
    assert doc["status"] == 404
    assert doc["request_id"] == request.rid


async def test_a_malformed_request_closes_the_connection(rt: Runtime) -> None:
    resp = await ProxyHandler(rt)(FakeRequest("GET", "/api/%zz"))
    assert isinstance(resp, Response)
    assert resp.status == 400
    assert resp.close


async def test_admit_picks_the_upstream_and_the_ratelimit_fields(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    request = FakeRequest("GET", "/limited/x?q=1")
    ctx = Ctx(0.0)
    handler.identify(request, rt.snapshot, ctx)
    up, target = await handler.admit(request, rt.snapshot, ctx)
    assert up is rt.snapshot.upstreams["api"]
    assert target == "/limited/x?q=1"
    assert ctx.route is not None
    assert ctx.route.name == "limited"
    assert request.extra_headers is not None
    assert dict(request.extra_headers)["RateLimit"].startswith('"per-ip";r=4;t=')


async def test_a_later_refusal_drops_the_ratelimit_fields(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    request = FakeRequest("POST", "/limited/x", [("Host", "h"), ("Content-Length", "5000")])
    resp = await handler(request)
    assert resp.status == 413
    assert request.extra_headers is None


async def test_the_budget_runs_out(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    statuses = []
    for _ in range(6):
        request = FakeRequest("POST", "/limited/x", [("Host", "h"), ("Content-Length", "5000")])
        statuses.append((await handler(request)).status)
    assert statuses == [413] * 5 + [429]


async def test_absolute_form_goes_upstream_as_its_path(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    request = FakeRequest("GET", "http://example.com/api/x?y=2")
    ctx = Ctx(0.0)
    handler.identify(request, rt.snapshot, ctx)
    _, target = await handler.admit(request, rt.snapshot, ctx)
    assert target == "/api/x?y=2"


async def test_the_fields_sent_upstream(rt: Runtime) -> None:
    request = FakeRequest(
        headers=[("Host", "example.com"), ("Connection", "x-hop"), ("X-Hop", "1"), ("A", "b")],
        peer="10.1.2.3",
    )
    ctx, via_proxy = _identified(rt, request)
    lines = upstream_fields(
        request, rt.snapshot, ctx, rt.snapshot.upstreams["api"], via_proxy=via_proxy
    )
    assert lines == (
        "A: b\r\nHost: example.com\r\nX-Forwarded-For: 10.1.2.3\r\nX-Forwarded-Proto: http\r\n"
        f"X-Forwarded-Host: example.com\r\nX-Real-IP: 10.1.2.3\r\nX-Request-ID: {ctx.rid}\r\n"
    )


async def test_a_body_is_read_before_the_bulkhead_and_let_go_on_refusal(rt: Runtime) -> None:
    handler = ProxyHandler(rt)
    up = rt.snapshot.upstreams["api"]
    up.inflight = up.max_inflight  # full
    request = FakeRequest("POST", "/api/x", [("Host", "h"), ("Content-Length", "3")], body=b"abc")
    ctx = Ctx(0.0)
    handler.identify(request, rt.snapshot, ctx)
    ctx.route = rt.snapshot.match("/api/x")
    with pytest.raises(Reject) as caught:
        await handler.leg.forward(request, rt.snapshot, ctx, up, "/api/x", via_proxy=False)
    assert caught.value.status == 503
    assert caught.value.kind == "bulkhead_full"
    assert handler.leg.buffered == 0  # the held body was let go of
    up.inflight = 0


async def test_a_websocket_upgrade_needs_the_upgrade_protocol(rt: Runtime) -> None:
    request = FakeRequest("GET", "/api/ws", [("Host", "h"), ("Upgrade", "websocket")])
    resp = await ProxyHandler(rt)(request)
    assert resp.status == 400
    assert isinstance(resp, Response)
    assert resp.close  # what follows may be tunnel data


async def test_probes_are_answered_before_the_pipeline(rt: Runtime) -> None:
    request = FakeRequest("GET", "/livez")
    resp = ProxyHandler(rt).answer_now(request)
    assert resp is not None
    assert resp.status == 200
    assert request.rid  # identified, for the answer's request id


def test_upstream_admission_follows_the_concurrency_rule(rt: Runtime) -> None:
    up = rt.snapshot.upstreams["api"]
    cap = up.max_inflight
    try:
        for inflight in (0, 1, cap // 2, cap - 2, cap - 1, cap):
            for crit in (0, inflight):
                up.inflight, up.critical_inflight = inflight, crit
                for p in Priority:
                    for reserved in (False, True):
                        want = admits(
                            p,
                            inflight=inflight,
                            critical_inflight=crit,
                            limit=cap,
                            cap=cap,
                            reserve=critical_reserve(cap) if reserved else 0,
                        )
                        assert up.admits(p, reserved=reserved) is want, (inflight, crit, p)
    finally:
        up.inflight = up.critical_inflight = 0
