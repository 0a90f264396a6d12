"""Hostile clients against the proxy and admin ports, over real sockets: each test is an
attack that once got through, kept so that it never does again."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

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
