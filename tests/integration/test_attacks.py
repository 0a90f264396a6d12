"""Hostile clients against the proxy and admin ports, over real sockets: each test is an
attack that once got through, kept so that it never does again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.gw import base_config, raw_exchange, running_gateway, serve, url
from tests.integration.test_overload import Held

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def held() -> AsyncIterator[tuple[Held, str]]:
    h = Held()
    async with serve(h.app) as url_:
        yield h, url_


async def test_a_refused_second_concurrency_key_leaks_no_slot_of_the_first(held: Any) -> None:
    """Two concurrency policies; the second's key field given twice is a 400 after the
    first's slot was taken: that slot must be given back, or a client could fill the
    route's budget for good with requests that never reach the upstream."""
    h, u = held
    cfg = base_config(
        u,
        rate_limit={
            "policies": {
                "route-inflight": {"max_inflight": 2, "key": "route"},
                "tenant-inflight": {"max_inflight": 5, "key": "header:X-Tenant"},
            }
        },
        routes=[
            {
                "name": "api",
                "path_prefix": "/",
                "upstream": "api",
                "rate_limits": ["route-inflight", "tenant-inflight"],
            }
        ],
    )
    async with running_gateway(cfg) as gw:
        port = gw.proxy_port or 0
        for _ in range(3):
            answer = await raw_exchange(
                port,
                b"GET /x HTTP/1.1\r\nHost: a\r\nX-Tenant: a\r\nX-Tenant: b\r\n"
                b"Connection: close\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 400 ")
        assert len(gw.runtime.inflight_keys) == 0
        h.go.set()
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
            assert r.status == 200


ADMIN_TOKEN = "att4ck-admin-token-5f2b"


def _fields(reply: bytes) -> tuple[int, dict[str, str]]:
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(head[0].split(" ")[1]), fields


ADMIN_ANSWERS = [
    pytest.param(b"GET /admin/ui HTTP/1.1\r\nHost: a\r\n", 200, id="page"),
    pytest.param(b"GET /admin/ui/app.js HTTP/1.1\r\nHost: a\r\n", 200, id="script"),
    pytest.param(b"GET /admin/stats HTTP/1.1\r\nHost: a\r\n", 401, id="no-token"),
    pytest.param(
        b"GET /admin/stats HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + ADMIN_TOKEN.encode()
        + b"\r\n",
        200,
        id="stats",
    ),
    pytest.param(b"GET /nope HTTP/1.1\r\nHost: a\r\n", 404, id="not-found"),
    pytest.param(b"PUT /admin/ui HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n", 405, id="method"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: a\r\n", 200, id="metrics"),
    pytest.param(b"GET * HTTP/1.1\r\nHost: a\r\n", 400, id="parse-error"),
]


@pytest.mark.parametrize("security_headers", [{}, {"enabled": False}, {"override": True}])
@pytest.mark.parametrize(("request_", "status"), ADMIN_ANSWERS)
async def test_every_admin_answer_forbids_sniffing_framing_and_caching(
    security_headers: dict[str, Any], request_: bytes, status: int
) -> None:
    """The admin port's answers are the gateway's own: whatever ``security_headers`` says
    for the proxy port (off, or overriding), each one, errors included, is no-sniff,
    unframeable, uncached and names no server software; and the operator page keeps the
    CSP it needs to run (its own script and style), never one that blocks it."""
    async with (
        serve(web.Application()) as u,
        running_gateway(
            base_config(u, security_headers=security_headers), {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        ) as gw,
    ):
        reply = await raw_exchange(
            gw.admin_port or 0, request_ + b"Connection: close\r\n\r\n", wait_s=2
        )
    got, fields = _fields(reply)
    assert got == status, reply[:300]
    assert fields.get("x-content-type-options") == "nosniff"
    assert "frame-ancestors 'none'" in fields.get("content-security-policy", "")
    assert fields.get("cache-control") == "no-store"
    assert "server" not in fields, fields
    if request_.startswith(b"GET /admin/ui"):
        assert "default-src 'self'" in fields["content-security-policy"]
    else:
        assert "default-src 'none'" in fields["content-security-policy"]
