"""The WebSocket leg: a client's upgrade relayed to its upstream, message by message."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from gateway.pipeline.wsregistry import OpenSocket


async def pump_ws(
    src: aiohttp.ClientWebSocketResponse | aiohttp.web.WebSocketResponse,
    dst: aiohttp.ClientWebSocketResponse | aiohttp.web.WebSocketResponse,
    seen: OpenSocket | None = None,
) -> None:
    """Copy WebSocket messages from ``src`` to ``dst`` until either side closes; each
    sets ``seen.active`` (the idle timeout's sweep reads it)."""
    async for msg in src:
        if dst.closed:
            break
        if seen is not None:
            seen.active = True
        if msg.type is aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is aiohttp.WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is aiohttp.WSMsgType.PONG:
            await dst.pong(msg.data)
        else:
            break
    if not dst.closed:
        code = src.close_code or aiohttp.WSCloseCode.OK
        await dst.close(code=code)


async def splice_ws(
    client: aiohttp.web.WebSocketResponse,
    upstream: aiohttp.ClientWebSocketResponse,
    seen: OpenSocket | None = None,
) -> None:
    """Run both directions until one ends, then close the other."""
    a = asyncio.ensure_future(pump_ws(client, upstream, seen))
    b = asyncio.ensure_future(pump_ws(upstream, client, seen))
    try:
        await asyncio.wait((a, b), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (a, b):
            if not t.done():
                t.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        if not upstream.closed:
            await upstream.close()
