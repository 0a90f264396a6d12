"""A sample upstream to run in its own process (so that a test can SIGKILL it).

    python -m tests.reliability.upstream_app PORT

Paths: ``/health``; ``/stream?n=&delay=`` (a chunked response of n parts);
``/upload`` (reads the whole body, answers its size); ``/ws`` (WebSocket echo);
``/slow?s=``; ``/big?kb=`` (n KiB with a Content-Length); anything else answers ``ok``.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import WSMsgType, web


async def health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def stream(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "5"))
    delay = float(request.query.get("delay", "0.02"))
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for i in range(n):
        await resp.write(b"part%d;" % i)
        await asyncio.sleep(delay)
    await resp.write_eof()
    return resp


async def upload(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"size": size})


async def big(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_length = int(request.query.get("kb", "1024")) << 10
    await resp.prepare(request)
    part = b"b" * 65536
    left = resp.content_length
    while left > 0:
        await resp.write(part[:left])
        left -= len(part)
    return resp


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type is WSMsgType.TEXT:
            await sock.send_str("echo:" + msg.data)
    return sock


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "0.1")))
    return web.Response(text="ok")


async def other(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/stream", stream)
    app.router.add_post("/upload", upload)
    app.router.add_get("/ws", ws)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


def main() -> None:
    port = int(sys.argv[1])
    web.run_app(make_app(), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
