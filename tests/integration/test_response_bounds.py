"""Upstream answers are bounded: a response head over ``max_response_header_bytes`` or
with more than 100 fields is a 502, logged and counted; the client gets none of it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from structlog.testing import capture_logs

from tests.gw import base_config, raw_exchange, running_gateway
from tests.integration.test_proxy import _upgrade_request

pytestmark = pytest.mark.timeout(60)

LEAK = b"leaked-by-upstream"
_FIELD = b"X-F: " + LEAK + b"\r\n"
HEADS = {
    "one-200k-field": b"HTTP/1.1 200 OK\r\nX-Big: " + LEAK * 11_000 + b"\r\n",
    "20000-fields": b"HTTP/1.1 200 OK\r\n" + _FIELD * 20_000,
    "101-fields": b"HTTP/1.1 200 OK\r\n" + _FIELD * 101,
    "long-status-line": b"HTTP/1.1 200 " + LEAK * 4_000 + b"\r\nX-F: " + LEAK + b"\r\n",
}
OK_HEAD = b"HTTP/1.1 200 OK\r\n" + _FIELD * 99  # with Content-Length: 100 fields


class RawUpstream:
    """Answers /health with 200 and anything else with ``head``; records closes."""

    def __init__(self, head: bytes, *, drip: bool = False) -> None:
        self.head = head
        self.drip = drip
        self.closed_by_gateway = 0

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        answered = False
        try:
            while True:
                request = await r.readuntil(b"\r\n\r\n")
                if request.startswith(b"GET /health"):
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await w.drain()
                    continue
                answered = True
                answer = self.head + b"Content-Length: 2\r\n\r\nok"
                step = 4096 if self.drip else len(answer)
                for i in range(0, len(answer), step):
                    w.write(answer[i : i + step])
                    await w.drain()
                    if self.drip:
                        await asyncio.sleep(0.002)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if answered and self.head is not OK_HEAD:
                self.closed_by_gateway += 1  # the gateway closed its end: not pooled
            w.close()


@asynccontextmanager
async def raw_upstream(up: RawUpstream) -> AsyncIterator[str]:
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def _errors(gw: object, kind: str) -> float:
    value = gw.runtime.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "gateway_upstream_errors_total", {"upstream": "api", "kind": kind}
    )
    return value or 0.0


@pytest.mark.parametrize("drip", [False, True], ids=["one-write", "dripped"])
@pytest.mark.parametrize("case", sorted(HEADS))
async def test_an_oversized_response_head_is_a_logged_counted_502(case: str, *, drip: bool) -> None:
    up = RawUpstream(HEADS[case], drip=drip)
    async with raw_upstream(up) as base, running_gateway(base_config(base)) as gw:
        with capture_logs() as logs:
            raw = await raw_exchange(
                gw.proxy_port or 0, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 "), raw[:300]
        assert b"application/problem+json" in head
        assert LEAK not in raw  # none of the upstream's head reached the client
        assert json.loads(body)["status"] == 502
        assert _errors(gw, "response_head_too_large") == 1
        (event,) = [e for e in logs if e["event"] == "upstream_response_rejected"]
        assert event["upstream"] == "api"
        assert "fields" in event["reason"] or "bytes" in event["reason"]
        assert event["request_id"]
        await asyncio.sleep(0.1)
        assert up.closed_by_gateway == 1  # the connection was closed, not pooled


async def test_a_head_of_100_fields_passes_and_the_bound_is_configurable() -> None:
    up = RawUpstream(OK_HEAD)
    async with raw_upstream(up) as base:
        async with running_gateway(base_config(base)) as gw:
            raw = await raw_exchange(
                gw.proxy_port or 0, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
            assert raw.count(LEAK) == 99
        cfg = base_config(base)
        cfg["upstreams"]["api"]["max_response_header_bytes"] = 2048  # 99 fields are ~2.5 KB
        async with running_gateway(cfg) as gw:
            raw = await raw_exchange(
                gw.proxy_port or 0, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            assert raw.startswith(b"HTTP/1.1 502 "), raw[:300]
            assert LEAK not in raw


@pytest.mark.parametrize("case", ["one-200k-field", "101-fields", "long-status-line"])
async def test_an_oversized_websocket_handshake_answer_is_a_502(case: str) -> None:
    head = HEADS[case].replace(b"200 OK", b"101 Switching Protocols")
    ws_head = (
        head + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    )
    up = RawUpstream(ws_head)
    async with raw_upstream(up) as base, running_gateway(base_config(base)) as gw:
        with capture_logs() as logs:
            raw = await raw_exchange(gw.proxy_port or 0, _upgrade_request("/ws"))
        assert raw.startswith(b"HTTP/1.1 502 "), raw[:300]
        assert LEAK not in raw
        assert _errors(gw, "response_head_too_large") == 1
        assert [e["upstream"] for e in logs if e["event"] == "upstream_response_rejected"] == [
            "api"
        ]
