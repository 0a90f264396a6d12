"""The WebSocket leg: a client's upgrade relayed to its upstream, message by message.

The caps (per client, per upstream) are checked before the upstream is asked; the open
socket is entered in the registry, through which bans, list reloads, the idle timeout
and the drain reach it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import hdrs, web

from gateway import problem
from gateway.core.wsguard import admission
from gateway.pipeline.reject import Reject, bulkhead_full, circuit_open
from gateway.pipeline.upstream_leg import count_error, upstream_fields
from gateway.upstream.hop_by_hop import header_pairs
from gateway.upstream.pool import UpstreamError

if TYPE_CHECKING:
    from gateway.pipeline.context import Ctx
    from gateway.pipeline.request import PipelineRequest
    from gateway.pipeline.snapshot import Snapshot
    from gateway.pipeline.wsregistry import OpenSocket
    from gateway.runtime import Runtime
    from gateway.upstream.state import UpstreamState


def websocket_handshake(request: PipelineRequest) -> web.BaseRequest:
    """The aiohttp request a WebSocket upgrade is answered on (400 where there is none:
    the proxy port's own server hands real upgrades, with Connection: Upgrade, over)."""
    ws_request = request.websocket_request()
    if ws_request is None:
        raise Reject(400, "a WebSocket upgrade needs Connection: Upgrade", event="bad_request")
    return ws_request


async def relay_websocket(
    rt: Runtime,
    request: PipelineRequest,
    ws_request: web.BaseRequest,
    snap: Snapshot,
    ctx: Ctx,
    up: UpstreamState,
    raw_path_qs: str,
    *,
    via_proxy: bool,
) -> web.StreamResponse:
    """Check the handshake and the caps, connect upstream, answer the client's
    handshake and relay messages both ways until one side ends."""
    loop = asyncio.get_running_loop()
    headers = request.headers
    protocols = [
        p.strip() for p in headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",") if p.strip()
    ]
    # the handshake prepare() will check (version, key), before the upstream is bothered;
    # and no body: it would not be sent on, and an upstream told of it by Content-Length
    # would wait for it, or read the first WebSocket frames as that body
    if request.body_exists or not web.WebSocketResponse().can_prepare(ws_request).ok:
        raise Reject(
            400,
            "not a valid WebSocket handshake",
            event="bad_request",
            headers={hdrs.SEC_WEBSOCKET_VERSION: "13"},  # the one spoken (RFC 6455 4.4)
        )
    registry = rt.websockets
    refused = admission(
        registry.open_for(ctx.ban_key),
        snap.settings.config.websocket.max_per_client,
        registry.open_to(up.name),
        up.config.max_connections,
    )
    if refused == "client":
        raise Reject(
            503,
            "the client has too many WebSockets open",
            type_=problem.problem_type("too-many-websockets"),
            headers={"Retry-After": "1"},
        )
    if refused == "upstream":
        raise bulkhead_full(up, "WebSockets open")
    up_headers = header_pairs(upstream_fields(request, snap, ctx, up, via_proxy=via_proxy))
    up_headers = [h for h in up_headers if not h[0].lower().startswith("sec-websocket-")]
    # a message is held whole before it is passed on: it is bounded like a body
    # (aiohttp refuses one of max_msg_size bytes or more, and stops inflating there)
    max_msg = snap.max_body_bytes + 1
    now = loop.time()
    if not up.breaker.acquire(now):
        raise circuit_open(up, now)
    sock = registry.add(ctx.ban_key, ctx.client, up.name, exempt=ctx.exempt)
    up.websockets += 1
    try:
        try:
            up_ws = await up.client.ws_connect(
                raw_path_qs, up_headers, protocols, max_msg_size=max_msg
            )
        except UpstreamError as exc:
            up.breaker.record(loop.time(), failure=True)
            count_error(rt, up, ctx, exc)
            # the kind only, as for a request: the error's text names internal addresses
            raise Reject(
                502 if exc.kind != "timeout" else 504,
                f"upstream {up.name!r} is unreachable: {exc.kind} error",
            ) from None
        except aiohttp.WSServerHandshakeError as exc:
            up.breaker.record(loop.time(), failure=exc.status >= 500)
            raise Reject(
                502, f"upstream {up.name!r} refused the WebSocket upgrade ({exc.status})"
            ) from None
        up.breaker.record(loop.time(), failure=False)
        ws = web.WebSocketResponse(
            protocols=[up_ws.protocol] if up_ws.protocol else (),
            autoping=False,
            autoclose=False,
            max_msg_size=max_msg,
            compress=False,  # no permessage-deflate toward clients: no inflating bombs
        )
        try:
            await ws.prepare(ws_request)
        except ConnectionError:
            # the client went away during the upstream handshake: no error of anyone's
            # (aiohttp takes the answer's failed write as the client gone, quietly)
            await up_ws.close()
            ctx.status = 499
            return web.Response(status=499)
        except BaseException:
            await up_ws.close()
            raise
        ctx.status = 101
        registry.attach(sock, ws, request.transport, loop.time())
        await splice_ws(ws, up_ws, sock)
    finally:
        registry.remove(sock)
        up.websockets -= 1
    return ws


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
