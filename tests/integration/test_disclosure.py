"""The proxy port's own answers tell the internet nothing inside: no upstream address."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import free_port
from tests.gw import base_config, running_gateway, url

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("websocket", [False, True], ids=["http", "websocket"])
async def test_an_unreachable_upstream_is_a_502_naming_no_address(websocket: bool) -> None:
    down_port = free_port()  # nothing listens there: the connect is refused
    cfg = base_config(f"http://127.0.0.1:{down_port}")
    headers = (
        {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        if websocket
        else {}
    )
    async with (
        running_gateway(cfg) as gw,
        aiohttp.ClientSession() as s,
        s.get(url(gw, "/chat"), headers=headers) as r,
    ):
        body = await r.text()
    assert r.status == 502, body
    assert r.content_type == "application/problem+json"
    for internal in ("127.0.0.1", str(down_port), "Errno", "Connect call"):
        assert internal not in body, body
