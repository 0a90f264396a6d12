"""Listeners: `listen.host` / `admin.host` "::" accept IPv4 and IPv6 (dual stack)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.gw import base_config, running_gateway, serve

pytestmark = pytest.mark.timeout(30)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
async def echo_client() -> AsyncIterator[str]:
    """An upstream that answers with the client address the gateway forwarded."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("X-Forwarded-For", "-"))

    async with serve(handle) as url_:
        yield url_


@pytest.mark.parametrize("host", ["::", "0:0:0:0:0:0:0:0"])
async def test_the_any_ipv6_address_listens_on_ipv4_and_ipv6(echo_client: str, host: str) -> None:
    if not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1): dual stack cannot be tested")
    cfg = base_config(
        echo_client,
        listen={"host": host, "port": free_port()},
        admin={"host": host, "port": free_port()},
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        for loopback, client in (("127.0.0.1", "127.0.0.1"), ("[::1]", "::1")):
            async with s.get(f"http://{loopback}:{gw.proxy_port}/who") as r:
                assert r.status == 200, loopback
                # an IPv4 client is itself, not ::ffff:127.0.0.1 (its limits, bans, logs)
                assert await r.text() == client
            async with s.get(f"http://{loopback}:{gw.admin_port}/livez") as r:
                assert (r.status, await r.text()) == (200, "ok\n"), loopback
