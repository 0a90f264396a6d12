"""Open WebSockets under the edge rules (SPEC section 9), over real sockets: a ban or a
deny-list reload closes them with 1008 (on every replica), an idle one is closed with
1001, one client's count is capped, and a reload does not reset an upstream's count."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import Gateway
from tests.gw import base_config, running_gateway, serve, url, wait_for

pytestmark = pytest.mark.timeout(60)


class Echo:
    """An upstream echoing WebSocket messages, counting the sockets it saw open and end."""

    def __init__(self) -> None:
        self.opened = 0
        self.ended = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/ws-slow":  # a slow handshake
            await asyncio.sleep(0.5)
        elif request.path != "/ws":
            return web.Response(text="ok")
        self.opened += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
        finally:
            self.ended += 1
        return ws


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Echo, str]]:
    e = Echo()
    async with serve(e.handle) as url_:
        yield e, url_


def _fresh_ip(first: int) -> str:
    """An address no other test uses (bans outlive a test in the shared Redis)."""
    n = uuid.uuid4().int
    return f"{first}.{n >> 16 & 255}.{n >> 8 & 255}.{n % 250 + 1}"


def _cfg(upstream: str, **overrides: Any) -> dict[str, Any]:
    return base_config(upstream, trusted_proxies=["127.0.0.1/32"], **overrides)


def _as(client: str) -> dict[str, str]:
    return {"X-Forwarded-For": client}


async def _open(s: aiohttp.ClientSession, gw: Gateway, client: str) -> Any:
    ws = await s.ws_connect(url(gw, "/ws"), headers=_as(client))
    await ws.send_str("hi")
    assert await ws.receive_str(timeout=5) == "echo:hi"
    return ws


async def _closed_with(ws: Any, within_s: float) -> int:
    """The close code the gateway sent within ``within_s`` (fails if it sent none)."""
    msg = await ws.receive(timeout=within_s)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return int(msg.data)


async def _alive(ws: Any) -> bool:
    await ws.send_str("still")
    return bool(await ws.receive_str(timeout=5) == "echo:still")


async def _probe(s: aiohttp.ClientSession, gw: Gateway, client: str) -> None:
    """Two /.env probes: 2 x 25 points reach the default ban_score of 50."""
    for _ in range(2):
        async with s.get(url(gw, "/.env"), headers=_as(client)):
            pass


async def _refused(s: aiohttp.ClientSession, gw: Gateway, client: str) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await s.ws_connect(url(gw, "/ws"), headers=_as(client))
    return info.value.status


async def test_a_banned_client_loses_its_open_websockets_with_1008(
    echo: tuple[Echo, str],
) -> None:
    """It opens WebSockets, then probes /.env and is banned: within a second its sockets
    are closed with 1008, toward the upstream too; another client's stays open."""
    up, up_url = echo
    scanner, other = _fresh_ip(10), _fresh_ip(11)
    async with running_gateway(_cfg(up_url)) as gw, aiohttp.ClientSession() as s:
        mine = [await _open(s, gw, scanner) for _ in range(2)]
        theirs = await _open(s, gw, other)
        await _probe(s, gw, scanner)
        assert gw.runtime.bans.banned(scanner) is not None
        for ws in mine:
            assert await _closed_with(ws, 1.0) == 1008
        assert await _alive(theirs)
        assert await _refused(s, gw, scanner) == 403
        await theirs.close()
        assert await wait_for(lambda: up.ended == 3)


async def test_a_ban_of_an_ipv6_prefix_closes_the_websockets_of_every_address_in_it(
    echo: tuple[Echo, str],
) -> None:
    _, up_url = echo
    async with running_gateway(_cfg(up_url)) as gw, aiohttp.ClientSession() as s:
        ws = await _open(s, gw, "2001:db8:7:7::1")
        await _probe(s, gw, "2001:db8:7:7::2")  # another address of the same /64
        assert await _closed_with(ws, 1.0) == 1008


async def test_a_ban_on_one_replica_closes_the_websocket_on_another(
    echo: tuple[Echo, str], redis_url: str
) -> None:
    _, up_url = echo
    scanner = _fresh_ip(12)
    env = {"GATEWAY_REDIS_URL": redis_url}
    async with (
        running_gateway(_cfg(up_url, rate_limit={"backend": "redis"}), env) as a,
        running_gateway(_cfg(up_url, rate_limit={"backend": "redis"}), env) as b,
        aiohttp.ClientSession() as s,
    ):
        ws = await _open(s, b, scanner)
        await _probe(s, a, scanner)
        assert await wait_for(lambda: a.runtime.bans.banned(scanner) is not None)
        assert await _closed_with(ws, 1.0) == 1008
        await a.runtime.bans.unban(scanner)


async def test_a_reload_that_denies_the_client_closes_its_websockets(
    echo: tuple[Echo, str], tmp_path: Path
) -> None:
    _, up_url = echo
    denied, other = _fresh_ip(13), _fresh_ip(14)
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(up_url)
    path.write_text(yaml.safe_dump(cfg))
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        ws = await _open(s, gw, denied)
        kept = await _open(s, gw, other)
        cfg["deny_cidrs"] = [f"{denied}/32"]
        path.write_text(yaml.safe_dump(cfg))
        ok, _ = await gw.reloader.reload("test")
        assert ok
        assert await _closed_with(ws, 1.0) == 1008
        assert await _alive(kept)
        assert await _refused(s, gw, denied) == 403
        await kept.close()


async def test_an_idle_websocket_is_closed_with_1001_and_a_busy_one_is_not(
    echo: tuple[Echo, str],
) -> None:
    _, up_url = echo
    cfg = _cfg(up_url, websocket={"idle_timeout_s": 0.5})
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        loop = asyncio.get_running_loop()
        idle = await _open(s, gw, _fresh_ip(15))
        busy = await _open(s, gw, _fresh_ip(16))
        opened = loop.time()

        async def chat() -> None:
            for _ in range(8):  # 1.6 s of messages, 0.2 s apart
                await asyncio.sleep(0.2)
                assert await _alive(busy)

        chatting = asyncio.ensure_future(chat())
        assert await _closed_with(idle, 2.0) == 1001
        assert 0.45 <= loop.time() - opened <= 1.5  # one sweep late, plus a busy machine
        await chatting
        assert not busy.closed
        assert await _closed_with(busy, 2.0) == 1001  # idle in its turn


async def test_one_client_past_max_per_client_gets_503_before_the_upstream_is_asked(
    echo: tuple[Echo, str],
) -> None:
    up, up_url = echo
    cfg = _cfg(up_url, websocket={"max_per_client": 2})
    client = _fresh_ip(17)
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        held = [await _open(s, gw, client) for _ in range(2)]
        assert gw.proxy_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nContent-Type: application/problem+json" in head
        assert b"\r\nRetry-After: " in head
        assert b"too many WebSockets" in body
        assert up.opened == 2  # the refused one never reached the upstream
        other = await _open(s, gw, _fresh_ip(18))  # another client is not held back
        await held[0].close()
        again = await _open(s, gw, client)  # a slot of its own is free again
        for ws in (held[1], other, again):
            await ws.close()


async def test_the_addresses_of_one_ipv6_prefix_share_max_per_client(
    echo: tuple[Echo, str],
) -> None:
    _, up_url = echo
    cfg = _cfg(up_url, websocket={"max_per_client": 2})
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        held = [await _open(s, gw, f"2001:db8:5:5::{i}") for i in (1, 2)]
        assert await _refused(s, gw, "2001:db8:5:5::3") == 503
        other = await _open(s, gw, "2001:db8:5:6::1")  # another /64
        for ws in (*held, other):
            await ws.close()


async def test_a_reload_that_rebuilds_the_pool_keeps_counting_open_websockets(
    echo: tuple[Echo, str], tmp_path: Path
) -> None:
    """max_connections caps open WebSockets per upstream; a reload that rebuilds the
    upstream's pool (a changed connect timeout) must not start the count again."""
    _, up_url = echo
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(up_url)
    cfg["upstreams"]["api"]["max_connections"] = 2
    path.write_text(yaml.safe_dump(cfg))
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        held = [await _open(s, gw, _fresh_ip(19)) for _ in range(2)]
        assert await _refused(s, gw, _fresh_ip(20)) == 503
        before = gw.runtime.upstreams["api"]
        cfg["upstreams"]["api"]["connect_timeout_s"] = 1.5
        path.write_text(yaml.safe_dump(cfg))
        ok, _ = await gw.reloader.reload("test")
        assert ok
        assert gw.runtime.upstreams["api"] is not before  # the pool was rebuilt
        assert await _refused(s, gw, _fresh_ip(21)) == 503
        await held[0].close()
        assert await wait_for(lambda: gw.runtime.websockets.open_to("api") == 1)
        again = await _open(s, gw, _fresh_ip(22))
        for ws in (held[1], again):
            await ws.close()


async def test_a_reload_that_rebuilds_the_pool_leaves_open_websockets_open(
    echo: tuple[Echo, str], tmp_path: Path
) -> None:
    """The old pool is closed once its requests are done (timeout_s later), but not under
    the WebSockets still open through it; they end as WebSockets do, and then it closes."""
    _, up_url = echo
    path = tmp_path / "gateway.yaml"
    cfg = _cfg(up_url)
    cfg["upstreams"]["api"]["timeout_s"] = 0.2
    path.write_text(yaml.safe_dump(cfg))
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        ws = await _open(s, gw, _fresh_ip(23))
        old = gw.runtime.upstreams["api"]
        cfg["upstreams"]["api"]["connect_timeout_s"] = 1.5
        path.write_text(yaml.safe_dump(cfg))
        ok, _ = await gw.reloader.reload("test")
        assert ok
        await asyncio.sleep(2.0)  # well past the old pool's grace of timeout_s + 1
        assert await _alive(ws)
        await ws.close()
        assert await wait_for(lambda: old.client._session.closed, 3.0)


async def test_a_ban_during_the_handshakes_closes_the_websocket_as_it_opens(
    echo: tuple[Echo, str],
) -> None:
    _, up_url = echo
    scanner = _fresh_ip(24)
    async with running_gateway(_cfg(up_url)) as gw, aiohttp.ClientSession() as s:
        opening = asyncio.ensure_future(s.ws_connect(url(gw, "/ws-slow"), headers=_as(scanner)))
        await asyncio.sleep(0.1)  # the upstream's handshake is under way
        await _probe(s, gw, scanner)
        ws = await opening
        assert await _closed_with(ws, 1.0) == 1008


async def test_concurrent_upgrades_of_one_client_cannot_pass_max_per_client(
    echo: tuple[Echo, str],
) -> None:
    """The count includes sockets whose handshakes are under way."""
    up, up_url = echo
    cfg = _cfg(up_url, websocket={"max_per_client": 2})
    client = _fresh_ip(25)
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(s.ws_connect(url(gw, "/ws-slow"), headers=_as(client)) for _ in range(6)),
            return_exceptions=True,
        )
        opened = [r for r in results if isinstance(r, aiohttp.ClientWebSocketResponse)]
        refused = [r for r in results if isinstance(r, aiohttp.WSServerHandshakeError)]
        assert len(opened) == 2
        assert [r.status for r in refused] == [503] * 4
        assert up.opened == 2
        for ws in opened:
            await ws.close()
