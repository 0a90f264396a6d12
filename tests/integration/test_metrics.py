"""The Prometheus exposition of a real gateway after real traffic (SPEC section 6).

Every metric of the contract must be present with exactly its label names, label values
must stay bounded (no client address, no raw path, no arbitrary method), and the text
must satisfy ``promtool check metrics`` when promtool is installed.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway import __version__
from gateway.app import Gateway
from gateway.config import load_text
from gateway.runtime import Runtime
from tests.conftest import free_port
from tests.gw import admin_url, base_config, raw_exchange, running_gateway, serve, url, wait_for

pytestmark = pytest.mark.timeout(60)

BANNED_IP = "10.20.30.40"
ROUTES = ("down", "limited", "shadowed", "api")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")

# sample name -> (family type, label names); histograms are checked on their buckets
EXPECTED: dict[str, tuple[str, frozenset[str]]] = {
    "gateway_requests_total": ("counter", frozenset({"route", "method", "code"})),
    "gateway_request_duration_seconds_bucket": ("histogram", frozenset({"route", "le"})),
    "gateway_upstream_request_duration_seconds_bucket": (
        "histogram",
        frozenset({"upstream", "le"}),
    ),
    "gateway_upstream_errors_total": ("counter", frozenset({"upstream", "kind"})),
    "gateway_inflight_requests": ("gauge", frozenset({"upstream"})),
    "gateway_ratelimit_decisions_total": ("counter", frozenset({"policy", "decision"})),
    "gateway_ratelimit_backend_errors_total": ("counter", frozenset()),
    "gateway_bans_total": ("counter", frozenset({"reason"})),
    "gateway_active_bans": ("gauge", frozenset()),
    "gateway_circuit_state": ("gauge", frozenset({"upstream", "state"})),
    "gateway_circuit_transitions_total": (
        "counter",
        frozenset({"upstream", "from_state", "to_state"}),
    ),
    "gateway_health_status": ("gauge", frozenset({"component", "status"})),
    "gateway_health_check_duration_seconds_bucket": (
        "histogram",
        frozenset({"component", "le"}),
    ),
    "gateway_config_reloads_total": ("counter", frozenset({"result"})),
    "gateway_config_last_reload_success_timestamp_seconds": ("gauge", frozenset()),
    "gateway_build_info": ("gauge", frozenset({"version", "python"})),
}


# --------------------------------------------------------------------------- helpers


class Upstream:
    """A real upstream: 404 for /api/missing, an echo of the path otherwise."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.Response(text="ok")
        self.paths.append(request.path)
        if request.path == "/api/missing":
            return web.Response(status=404, text="missing")
        return web.Response(text="upstream:" + request.path)


@dataclass
class Exposition:
    """One parsed scrape: samples by sample name, family type by sample name."""

    text: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exposition:
        expo = cls(text)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                expo.samples.setdefault(sample.name, []).append(sample)
                expo.types[sample.name] = family.type
        return expo

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples.get(name, []) if s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples in\n{self.text}"
        return found[0]

    def label_values(self, label: str) -> set[str]:
        return {s.labels[label] for ss in self.samples.values() for s in ss if label in s.labels}

    def all_label_values(self) -> Iterator[tuple[str, str, str]]:
        for name, ss in self.samples.items():
            for s in ss:
                for k, v in s.labels.items():
                    yield name, k, v


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    async with serve(up.app) as url_:
        yield up, url_


def _traffic_config(upstream_url: str) -> dict[str, Any]:
    hc = {"interval_s": 0.1, "timeout_s": 0.5, "healthy_threshold": 1, "unhealthy_threshold": 1}
    return base_config(
        upstream_url,
        trusted_proxies=["127.0.0.0/8"],
        upstreams={
            "api": {"url": upstream_url, "health": hc},
            "down": {
                "url": f"http://127.0.0.1:{free_port()}",  # nothing listens there
                "connect_timeout_s": 0.5,
                "health": {**hc, "critical": False},
                "circuit_breaker": {"consecutive_failures": 1, "open_s": 60},
                "retries": {"attempts": 1},
            },
        },
        routes=[  # no catch-all: an unknown path is a 404 of the gateway itself
            {"name": "down", "path_prefix": "/down/", "upstream": "down"},
            {
                "name": "limited",
                "path_prefix": "/limited/",
                "upstream": "api",
                "rate_limits": ["tight"],
            },
            {
                "name": "shadowed",
                "path_prefix": "/shadowed/",
                "upstream": "api",
                "rate_limits": ["watch"],
            },
            {"name": "api", "path_prefix": "/api/", "upstream": "api"},
        ],
        rate_limit={
            "policies": {
                "tight": {"requests": 1, "period_s": 60, "burst": 2},
                "watch": {"requests": 1, "period_s": 60, "burst": 1, "mode": "shadow"},
            }
        },
    )


async def _get(session: aiohttp.ClientSession, target: str, **kw: Any) -> int:
    async with session.get(target, **kw) as resp:
        await resp.read()
        return resp.status


async def _scrape(gw: Gateway) -> Exposition:
    async with aiohttp.ClientSession() as s, s.get(admin_url(gw, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return Exposition.parse(await resp.text())


# paths the traffic uses: none of them may become a label value
RAW_PATHS = (
    "/limited/a",
    "/shadowed/b",
    "/api/ok",
    "/api/missing",
    "/nowhere/xyz",
    "/down/x",
    "/.env",
    "/api/other",
    "/api/propfind",
    "/api/foo",
)


async def _drive(gw: Gateway) -> None:
    """The traffic every assertion below is about, with its expected statuses."""
    async with aiohttp.ClientSession() as s:
        assert [await _get(s, url(gw, "/limited/a")) for _ in range(3)] == [200, 200, 429]
        assert [await _get(s, url(gw, "/shadowed/b")) for _ in range(2)] == [200, 200]
        assert await _get(s, url(gw, "/api/ok")) == 200
        assert await _get(s, url(gw, "/api/missing")) == 404  # the upstream's 404
        assert await _get(s, url(gw, "/nowhere/xyz")) == 404  # no route
        assert [await _get(s, url(gw, "/down/x")) for _ in range(2)] == [502, 503]
        xff = {"X-Forwarded-For": BANNED_IP}
        assert [await _get(s, url(gw, "/.env"), headers=xff) for _ in range(2)] == [404, 403]
        assert await _get(s, url(gw, "/api/other"), headers=xff) == 403  # banned now
    # a method the parser knows but the gateway does not count by name ...
    reply = await raw_exchange(
        gw.proxy_port or 0, b"PROPFIND /api/propfind HTTP/1.1\r\nHost: t\r\n\r\n", wait_s=0.3
    )
    assert reply.startswith(b"HTTP/1.1 200")
    # ... and one nothing knows: either way its label must be OTHER
    reply = await raw_exchange(
        gw.proxy_port or 0, b"FOO /api/foo HTTP/1.1\r\nHost: t\r\n\r\n", wait_s=0.3
    )
    assert reply.split(b" ", 2)[1] in (b"200", b"400", b"405", b"501")


# --------------------------------------------------------------------------- tests


async def test_every_metric_of_the_contract_after_traffic(
    upstream: tuple[Upstream, str],
) -> None:
    _, up_url = upstream
    async with running_gateway(_traffic_config(up_url), {}) as gw:
        monitor = gw.runtime.monitor
        assert await wait_for(lambda: monitor.started)
        await _drive(gw)
        expo = await _scrape(gw)

    # every metric name, its type and exactly its label names
    for name, (kind, labels) in EXPECTED.items():
        assert name in expo.samples, f"{name} missing from\n{expo.text}"
        assert expo.types[name] == kind, name
        for sample in expo.samples[name]:
            assert set(sample.labels) == labels, (name, sample.labels)

    requests = {
        (s.labels["route"], s.labels["method"], s.labels["code"]): s.value
        for s in expo.samples["gateway_requests_total"]
    }
    for key, count in {
        ("limited", "GET", "200"): 2,
        ("limited", "GET", "429"): 1,
        ("shadowed", "GET", "200"): 2,
        ("api", "GET", "200"): 1,
        ("api", "GET", "404"): 1,
        ("none", "GET", "404"): 2,  # /nowhere/xyz and the first /.env
        ("down", "GET", "502"): 1,
        ("down", "GET", "503"): 1,
        ("none", "GET", "403"): 2,  # the banned client
        ("api", "OTHER", "200"): 1,  # PROPFIND
    }.items():
        assert requests.get(key) == count, (key, requests)
    assert expo.value("gateway_request_duration_seconds_count", route="limited") == 3
    assert expo.value("gateway_upstream_request_duration_seconds_count", upstream="api") >= 6

    rl = "gateway_ratelimit_decisions_total"
    assert expo.value(rl, policy="tight", decision="allowed") == 2
    assert expo.value(rl, policy="tight", decision="limited") == 1
    assert expo.value(rl, policy="watch", decision="allowed") == 1
    assert expo.value(rl, policy="watch", decision="shadow_limited") == 1
    assert expo.label_values("decision") <= {"allowed", "limited", "shadow_limited"}
    assert expo.value("gateway_ratelimit_backend_errors_total") == 0

    assert expo.value("gateway_bans_total", reason="suspicious_path") == 1
    assert expo.value("gateway_active_bans") == 1

    err = "gateway_upstream_errors_total"
    assert expo.value(err, upstream="down", kind="connect") == 1
    assert expo.value(err, upstream="down", kind="circuit_open") == 1
    assert expo.value(err, upstream="api", kind="connect") == 0
    for up in ("api", "down"):
        assert expo.value("gateway_inflight_requests", upstream=up) == 0

    # circuit_state: one series per state, exactly one of them at 1
    for up, current in (("api", "closed"), ("down", "open")):
        states = {
            s.labels["state"]: s.value
            for s in expo.samples["gateway_circuit_state"]
            if s.labels["upstream"] == up
        }
        assert states == {
            s: (1.0 if s == current else 0.0) for s in ("closed", "open", "half_open")
        }
    tr = "gateway_circuit_transitions_total"
    assert expo.value(tr, upstream="down", from_state="closed", to_state="open") == 1

    components = expo.label_values("component")
    assert {"upstream:api", "upstream:down", "event_loop"} <= components
    for comp in components & {"upstream:api", "upstream:down", "event_loop"}:
        statuses = {
            s.labels["status"]: s.value
            for s in expo.samples["gateway_health_status"]
            if s.labels["component"] == comp
        }
        assert sorted(statuses) == ["degraded", "healthy", "unhealthy"], comp
        assert sorted(statuses.values()) == [0, 0, 1], (comp, statuses)
    assert expo.value("gateway_health_status", component="upstream:api", status="healthy") == 1
    assert expo.value("gateway_health_status", component="upstream:down", status="unhealthy") == 1
    hc = "gateway_health_check_duration_seconds_count"
    assert expo.value(hc, component="upstream:api") >= 1

    assert expo.value("gateway_config_reloads_total", result="success") == 0
    assert expo.value("gateway_config_reloads_total", result="failure") == 0
    loaded_at = expo.value("gateway_config_last_reload_success_timestamp_seconds")
    assert time.time() - 120 < loaded_at <= time.time()
    build = {"version": __version__, "python": platform.python_version()}
    assert expo.value("gateway_build_info", **build) == 1

    # cardinality: no client address, no raw path, no arbitrary method in any label
    forbidden = {"127.0.0.1", BANNED_IP, "FOO", "PROPFIND", *RAW_PATHS}
    leaks = [(n, k, v) for n, k, v in expo.all_label_values() if v in forbidden or "/" in v]
    assert leaks == []
    assert expo.label_values("route") <= {*ROUTES, "none"}
    assert expo.label_values("method") <= {*HTTP_METHODS, "OTHER"}
    assert "OTHER" in expo.label_values("method")


async def test_unknown_method_counts_as_other(upstream: tuple[Upstream, str]) -> None:
    _, up_url = upstream
    async with running_gateway(base_config(up_url), {}) as gw:
        for method in (b"FOO", b"BREW", b"PROPFIND"):
            await raw_exchange(
                gw.proxy_port or 0, method + b" /x HTTP/1.1\r\nHost: t\r\n\r\n", wait_s=0.3
            )
        expo = await _scrape(gw)
    methods = expo.label_values("method")
    assert methods == {"OTHER"}
    total = sum(s.value for s in expo.samples["gateway_requests_total"])
    assert total == 3


async def test_metrics_on_proxy_port_when_enabled(upstream: tuple[Upstream, str]) -> None:
    up, up_url = upstream
    cfg = base_config(up_url, metrics={"on_proxy_port": True})
    async with running_gateway(cfg, {}) as gw, aiohttp.ClientSession() as s:
        assert await _get(s, url(gw, "/hello")) == 200
        async with s.get(url(gw, "/metrics")) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            expo = Exposition.parse(await resp.text())
    assert up.paths == ["/hello"]  # /metrics never reached the upstream
    assert expo.value("gateway_requests_total", route="api", method="GET", code="200") == 1
    # the scrape itself is not a proxied request
    assert sum(s.value for s in expo.samples["gateway_requests_total"]) == 1


async def test_metrics_path_is_proxied_when_disabled(upstream: tuple[Upstream, str]) -> None:
    up, up_url = upstream
    cfg = base_config(up_url, metrics={"on_proxy_port": False})
    async with running_gateway(cfg, {}) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/metrics")) as resp:
            assert resp.status == 200
            assert await resp.text() == "upstream:/metrics"
        expo = await _scrape(gw)  # the admin port still serves it
    assert up.paths == ["/metrics"]
    assert expo.value("gateway_requests_total", route="api", method="GET", code="200") == 1


async def test_promtool_accepts_the_exposition(upstream: tuple[Upstream, str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    _, up_url = upstream
    async with running_gateway(_traffic_config(up_url), {}) as gw:
        assert await wait_for(lambda: gw.runtime.monitor.started)
        await _drive(gw)
        expo = await _scrape(gw)
    proc = subprocess.run(
        [promtool, "check", "metrics"],
        input=expo.text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    report = (proc.stdout + proc.stderr).decode()
    # promtool exits non-zero on lint problems too (missing HELP, bad suffixes, ...)
    assert proc.returncode == 0, report
    assert report.strip() == "", report


async def test_recording_a_request_costs_microseconds() -> None:
    """The per-request metric work of the proxy: count + histogram + one policy decision."""
    rt = Runtime(load_text("", environ={}))
    try:
        n = 50_000
        decisions = rt.rl_counters("per-ip")
        rt.count_request("default", "GET", 200, 0.001)  # children made once, off the loop
        t0 = time.perf_counter()
        for _ in range(n):
            rt.count_request("default", "GET", 200, 0.0012)
            rt.rl_counters("per-ip")[0].inc()
        per_request = (time.perf_counter() - t0) / n
        print(f"\ncount_request + rl_counters().inc(): {per_request * 1e6:.2f} us per request")
        registry = rt.metrics.registry
        labels = {"route": "default", "method": "GET", "code": "200"}
        assert registry.get_sample_value("gateway_requests_total", labels) == n + 1
        allowed = {"policy": "per-ip", "decision": "allowed"}
        assert registry.get_sample_value("gateway_ratelimit_decisions_total", allowed) == n
        # made once, then looked up (the same counters; a compiled build hands out a new
        # tuple around them)
        again = rt.rl_counters("per-ip")
        assert all(a is b for a, b in zip(again, decisions, strict=True))
        assert per_request < 50e-6  # generous: a few microseconds are expected
    finally:
        await rt.close()


async def test_request_counts_follow_every_change_of_route_method_and_status() -> None:
    """count_request keeps each route's last child: counts land on the right series
    whatever the order, and the route's figures see every request."""
    rt = Runtime(load_text("", environ={}))
    try:
        seq = [
            ("a", "GET", 200),
            ("a", "GET", 200),
            ("a", "POST", 200),
            ("a", "GET", 404),
            ("b", "GET", 200),
            ("a", "GET", 200),
            ("b", "GET", 500),
            ("a", "POST", 200),
            ("b", "GET", 500),
        ]
        for n, (route, method, status) in enumerate(seq):
            rt.count_request(route, method, status, 0.001 * n, 1_000_000.5)
        rt.count_request("b", "GET", 500, 0.5)  # no time given: the clock's
        registry = rt.metrics.registry
        want: dict[tuple[str, str, int], int] = {}
        for key in [*seq, ("b", "GET", 500)]:
            want[key] = want.get(key, 0) + 1
        for (route, method, status), count in want.items():
            labels = {"route": route, "method": method, "code": str(status)}
            assert registry.get_sample_value("gateway_requests_total", labels) == count
        for route in ("a", "b"):
            seen = registry.get_sample_value(
                "gateway_request_duration_seconds_count", {"route": route}
            )
            assert seen == sum(c for (r, _, _), c in want.items() if r == route)
        a = rt.route_series["a"].summary(1_000_000.9)
        assert (a.requests, a.errors) == (6, 0)
        b = rt.route_series["b"].summary(1_000_000.9)
        assert (b.requests, b.errors) == (3, 2)  # the clock's one is not in that second
    finally:
        await rt.close()
