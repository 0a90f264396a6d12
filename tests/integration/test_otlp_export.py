"""OTLP export of sampled requests (tracing.otlp_endpoint, the extra gateway[otel]) to a
real OTLP/HTTP receiver: an aiohttp server accepting POST /v1/traces, decoded with
opentelemetry-proto."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.config import ConfigError, load_text
from gateway.core.tracecontext import parse_traceparent
from tests.conftest import free_port
from tests.gw import base_config, running_gateway, serve, url, wait_for

pytest.importorskip("opentelemetry.sdk.trace", reason="the extra gateway[otel] is not installed")
trace_service = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Receiver:
    """The spans a collector received, decoded, and the raw bodies."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, span)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        self.bodies.append(body)
        msg = trace_service.ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                self.spans.extend((resource, span) for span in ss.spans)
        return web.Response(
            body=trace_service.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


def _attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, Receiver]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.handle)
    async with serve(app) as base:
        yield base, rec


@pytest.fixture
async def upstream_seen() -> AsyncIterator[tuple[str, list[str]]]:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        if request.path != "/health":
            seen.append(request.headers["traceparent"])
        return web.Response(status=201 if request.path.startswith("/api/") else 200)

    async with serve(handler) as up:
        yield up, seen


async def test_sampled_requests_are_exported_with_the_trace_sent_upstream(
    receiver: tuple[str, Receiver],
    upstream_seen: tuple[str, list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, rec = receiver
    up, seen = upstream_seen
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: the test need not wait 5 s
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    cfg = base_config(
        up,
        routes=[{"name": "items", "path_prefix": "/api/", "upstream": "api"}],
        tracing={"sample_ratio": 0.0, "otlp_endpoint": base},  # the base URL: /v1/traces added
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        # continued and sampled by the caller: exported, whatever the ratio
        headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
        async with s.get(url(gw, "/api/items?secret=hunter2"), headers=headers) as resp:
            assert resp.status == 201
        # new traces at ratio 0, and an unsampled caller: not exported
        async with s.get(url(gw, "/api/other")) as resp:
            assert resp.status == 201
        headers = {"traceparent": f"00-{TRACE}-{PARENT}-00"}
        async with s.get(url(gw, "/api/third"), headers=headers) as resp:
            assert resp.status == 201
        assert await wait_for(lambda: bool(rec.spans), timeout=10)
        sent = parse_traceparent(seen[0])
        assert sent is not None
        resource, span = rec.spans[0]
        assert span.trace_id.hex() == sent[0] == TRACE
        assert span.span_id.hex() == sent[1]  # the upstream's parent is the gateway's span
        assert span.parent_span_id.hex() == PARENT  # the caller's span
        assert span.name == "items"
        assert span.kind == span.SPAN_KIND_SERVER
        assert span.end_time_unix_nano > span.start_time_unix_nano
        assert _attrs(span) == {
            "http.request.method": "GET",
            "http.response.status_code": 201,
            "gateway.route": "items",
            "gateway.upstream": "api",
        }
        assert resource["service.name"] == "gateway"
        # no client address, no path with its query
        body = b"".join(rec.bodies)
        assert b"hunter2" not in body
        assert b"/api/items" not in body
        assert b"127.0.0.1" not in body
    assert len(rec.spans) == 1  # the unsampled ones never were, the close sent what was queued


async def test_a_new_trace_sampled_at_ratio_one_is_exported_and_a_5xx_is_an_error(
    receiver: tuple[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, rec = receiver
    seen: list[str] = []

    async def failing(request: web.Request) -> web.Response:
        if request.path != "/health":
            seen.append(request.headers["traceparent"])
        return web.Response(status=503 if request.path != "/health" else 200)

    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge")
    async with serve(failing) as up:
        cfg = base_config(up, tracing={"sample_ratio": 1.0, "otlp_endpoint": f"{base}/v1/traces"})
        async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
            async with s.post(url(gw, "/submit"), data=b"x") as resp:
                assert resp.status == 503
            async with s.get(url(gw, "/nowhere-else")) as resp:
                assert resp.status == 503
        # closed: what was queued has been sent
    assert len(rec.spans) == 2
    by_trace = {span.trace_id.hex(): (resource, span) for resource, span in rec.spans}
    for value in seen:
        parsed = parse_traceparent(value)
        assert parsed is not None
        resource, span = by_trace[parsed[0]]
        assert span.span_id.hex() == parsed[1]
        assert not span.parent_span_id  # a new trace: the gateway's span is its root
        assert span.status.code == span.status.STATUS_CODE_ERROR
        assert resource["service.name"] == "edge"
    methods = sorted(_attrs(span)["http.request.method"] for _, span in rec.spans)
    assert methods == ["GET", "POST"]


def test_otlp_endpoint_without_the_extra_is_a_config_error_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    cfg = base_config("http://127.0.0.1:1", tracing={"otlp_endpoint": "http://collector:4318"})
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg))
    [problem] = info.value.problems
    assert problem.path == "tracing.otlp_endpoint"
    assert "gateway[otel]" in problem.message


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otel.example:443/custom/traces", "https://otel.example/custom/traces"),
    ],
)
def test_otlp_endpoint_is_a_traces_url(value: str, stored: str) -> None:
    cfg = base_config("http://127.0.0.1:1", tracing={"otlp_endpoint": value})
    assert load_text(yaml.safe_dump(cfg)).config.tracing.otlp_endpoint == stored


@pytest.mark.parametrize("value", ["collector:4318", "ftp://collector/", "http://c/v1?x=1"])
def test_a_bad_otlp_endpoint_is_refused(value: str) -> None:
    cfg = base_config("http://127.0.0.1:1", tracing={"otlp_endpoint": value})
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg))
    assert [p.path for p in info.value.problems] == ["tracing.otlp_endpoint"]


async def test_a_collector_that_is_down_does_not_hold_the_close() -> None:
    from gateway.core.tracecontext import start_or_continue
    from gateway.tracing import SpanExport

    export = SpanExport(f"http://127.0.0.1:{free_port()}/v1/traces", schedule_delay_s=0.05)
    for _ in range(3):
        trace = start_or_continue(None, None, 1.0)
        export.export(trace, "GET", "api", 200, "api", duration_s=0.001)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await export.aclose(timeout_s=1.0)
    assert loop.time() - start < 2.0  # the exporter's retries go on for seconds


async def test_spans_past_the_budget_are_not_exported_but_still_traced_upstream(
    receiver: tuple[str, Receiver], upstream_seen: tuple[str, list[str]]
) -> None:
    base, rec = receiver
    up, seen = upstream_seen
    tracing = {"sample_ratio": 1.0, "otlp_endpoint": base, "max_spans_per_s": 3}
    async with running_gateway(base_config(up, tracing=tracing)) as gw:
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                async with s.get(url(gw, "/x")) as resp:
                    assert resp.status == 200
        spans = gw.runtime.spans
        assert spans is not None
        assert spans.dropped >= 15
    assert len(seen) == 20
    assert all(value.endswith("-01") for value in seen)  # every one sampled upstream
    assert 3 <= len(rec.spans) <= 5  # the burst, and what refilled meanwhile
