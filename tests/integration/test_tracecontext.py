"""W3C Trace Context over real sockets (SPEC section 12): what the upstream receives, what
the client gets back (nothing), and the access log's trace_id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.config import load_text
from gateway.core.tracecontext import parse_traceparent
from tests.gw import AccessLines, base_config, running_gateway, serve, url

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


class Seen:
    """What the upstream received: the trace fields of each request (all their lines)."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[str], list[str]]] = []

    @property
    def last(self) -> tuple[str, str, int]:
        fields, _ = self.requests[-1]
        assert len(fields) == 1, fields
        parsed = parse_traceparent(fields[0])
        assert parsed is not None, fields
        assert fields[0].startswith("00-")
        return parsed

    @property
    def state(self) -> list[str]:
        return self.requests[-1][1]


@pytest.fixture
async def traced() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/health":  # the gateway's own checks
            return web.Response(text="ok")
        seen.requests.append(
            (request.headers.getall("traceparent", []), request.headers.getall("tracestate", []))
        )
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(msg.data)
            return ws
        return web.Response(text="ok")

    async with serve(handler) as up:
        yield up, seen


async def _get(
    gw: Any, headers: CIMultiDict[str] | dict[str, str] | None = None, path: str = "/x"
) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s, s.get(url(gw, path), headers=headers) as resp:
        await resp.read()
        return resp


def _config(up: str, ratio: float) -> dict[str, Any]:
    return base_config(up, tracing={"sample_ratio": ratio})


async def test_a_valid_traceparent_is_continued_with_the_gateways_span_as_parent(
    traced: tuple[str, Seen], monkeypatch: pytest.MonkeyPatch
) -> None:
    up, seen = traced
    async with running_gateway(_config(up, 0.0)) as gw:
        log = AccessLines(gw.runtime, monkeypatch)
        resp = await _get(gw, {"traceparent": VALID, "tracestate": STATE})
        assert resp.status == 200
        trace_id, parent_id, flags = seen.last
        assert trace_id == TRACE
        assert parent_id != PARENT  # the gateway's own span
        assert flags == 1  # the caller's decision, whatever the ratio
        assert seen.state == [STATE]
        # nothing goes back to the client
        assert "traceparent" not in resp.headers
        assert "tracestate" not in resp.headers
        assert log.lines[-1]["trace_id"] == TRACE

        # an unsampled caller stays unsampled; its parent is the gateway's new span again
        await _get(gw, {"traceparent": f"00-{TRACE}-{PARENT}-00"})
        trace_id, second_parent, flags = seen.last
        assert (trace_id, flags) == (TRACE, 0)
        assert second_parent not in (PARENT, parent_id)
        assert seen.state == []


async def test_a_later_version_is_read_for_its_known_fields_and_sent_as_version_00(
    traced: tuple[str, Seen],
) -> None:
    up, seen = traced
    async with running_gateway(_config(up, 0.0)) as gw:
        await _get(gw, {"traceparent": f"cc-{TRACE}-{PARENT}-01-future", "tracestate": STATE})
        assert seen.last[0] == TRACE
        assert seen.requests[-1][0][0].startswith("00-")
        assert seen.state == [STATE]


INVALID = {
    "version-ff": f"ff-{TRACE}-{PARENT}-01",
    "version-00-extra-field": f"00-{TRACE}-{PARENT}-01-extra",
    "later-version-no-dash": f"cc-{TRACE}-{PARENT}-01extra",
    "upper-case-trace": f"00-{TRACE.upper()}-{PARENT}-01",
    "upper-case-parent": f"00-{TRACE}-{PARENT.upper()}-01",
    "zero-trace": f"00-{'0' * 32}-{PARENT}-01",
    "zero-parent": f"00-{TRACE}-{'0' * 16}-01",
    "short-trace": f"00-{TRACE[:-1]}-{PARENT}-01",
    "long-parent": f"00-{TRACE}-{PARENT}0-01",
    "short-flags": f"00-{TRACE}-{PARENT}-1",
    "non-hex-flags": f"00-{TRACE}-{PARENT}-0x",
    "non-hex-version": f"0g-{TRACE}-{PARENT}-01",
    "underscores": f"00_{TRACE}_{PARENT}_01",
    "empty": "",
    "garbage": "garbage",
}


@pytest.mark.parametrize("value", list(INVALID.values()), ids=list(INVALID))
async def test_an_invalid_traceparent_starts_a_new_trace_and_drops_tracestate(
    traced: tuple[str, Seen], value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    up, seen = traced
    async with running_gateway(_config(up, 1.0)) as gw:
        log = AccessLines(gw.runtime, monkeypatch)
        await _get(gw, {"traceparent": value, "tracestate": STATE})
        trace_id, parent_id, flags = seen.last
        assert trace_id != TRACE
        assert parent_id != PARENT
        assert flags == 1  # sample_ratio 1
        assert seen.state == []
        assert log.lines[-1]["trace_id"] == trace_id


async def test_two_traceparent_fields_are_invalid(traced: tuple[str, Seen]) -> None:
    up, seen = traced
    async with running_gateway(_config(up, 0.0)) as gw:
        two = CIMultiDict([("traceparent", VALID), ("traceparent", VALID), ("tracestate", STATE)])
        await _get(gw, two)
        trace_id, _, flags = seen.last
        assert trace_id != TRACE
        assert flags == 0  # sample_ratio 0
        assert seen.state == []


@pytest.mark.parametrize("ratio", [0.0, 1.0])
async def test_a_missing_traceparent_starts_a_trace_sampled_at_the_ratio(
    traced: tuple[str, Seen], ratio: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    up, seen = traced
    async with running_gateway(_config(up, ratio)) as gw:
        log = AccessLines(gw.runtime, monkeypatch)
        for _ in range(20):
            await _get(gw, {"tracestate": STATE})
    assert len(seen.requests) == 20
    traces = set()
    for fields, state in seen.requests:
        assert len(fields) == 1
        parsed = parse_traceparent(fields[0])
        assert parsed is not None
        assert parsed[2] == int(ratio)
        assert state == []  # a tracestate without a traceparent belongs to no trace
        traces.add(parsed[0])
    assert len(traces) == 20  # a new trace each
    assert [line["trace_id"] for line in log.lines] == [
        parse_traceparent(f[0])[0]  # type: ignore[index]
        for f, _ in seen.requests
    ]


async def test_a_new_traces_sampling_follows_a_reload(traced: tuple[str, Seen]) -> None:
    up, seen = traced
    cfg = _config(up, 0.0)
    async with running_gateway(cfg) as gw:
        await _get(gw)
        assert seen.last[2] == 0
        cfg["tracing"] = {"sample_ratio": 1.0}
        gw.runtime.apply(load_text(yaml.safe_dump(cfg)))
        await _get(gw)
        assert seen.last[2] == 1


async def test_a_refused_request_logs_its_trace_id(
    traced: tuple[str, Seen], monkeypatch: pytest.MonkeyPatch
) -> None:
    up, seen = traced
    cfg = _config(up, 0.0)
    cfg["routes"] = [{"name": "api", "path_prefix": "/api/", "upstream": "api"}]
    async with running_gateway(cfg) as gw:
        log = AccessLines(gw.runtime, monkeypatch)
        resp = await _get(gw, {"traceparent": VALID}, path="/elsewhere")
        assert resp.status == 404
        assert "traceparent" not in resp.headers
    assert seen.requests == []
    assert log.lines[-1]["trace_id"] == TRACE


async def test_a_websocket_upgrade_carries_the_trace_context(traced: tuple[str, Seen]) -> None:
    up, seen = traced
    async with running_gateway(_config(up, 0.0)) as gw, aiohttp.ClientSession() as s:
        headers = {"traceparent": VALID, "tracestate": STATE}
        async with s.ws_connect(url(gw, "/ws"), headers=headers) as ws:
            assert "traceparent" not in ws._response.headers
            await ws.send_str("hi")
            assert (await ws.receive()).data == "hi"
        trace_id, parent_id, flags = seen.last
        assert (trace_id, flags) == (TRACE, 1)
        assert parent_id != PARENT
        assert seen.state == [STATE]
