"""``gateway demo``: a sample api and bot upstream, and the gateway in front of them."""

from __future__ import annotations

import asyncio
import os
import signal
from importlib.resources import files

from aiohttp import WSMsgType, web

from gateway.app import Gateway
from gateway.config import load_text

DEMO_ADMIN_TOKEN = "demo-admin-token"  # the demo's own, printed for the user
DEMO_BOT_SECRET = "demo-bot-secret"


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": "world", "client": request.headers.get("X-Real-IP")})


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body_bytes": len(body),
        }
    )


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(min(float(request.query.get("s", "1")), 30))
    return web.json_response({"slept_s": float(request.query.get("s", "1"))})


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(f"echo: {msg.data}")
    return ws


async def _webhook(request: web.Request) -> web.Response:
    update = await request.json()
    return web.json_response({"ok": True, "update_id": update.get("update_id")})


def api_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_get("/api/hello", _hello)
    app.router.add_route("*", "/api/echo", _echo)
    app.router.add_get("/api/slow", _slow)
    app.router.add_get("/api/ws", _ws)
    return app


def bot_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", _health)
    app.router.add_post("/bot/webhook", _webhook)
    return app


CURLS = """
gateway demo: proxy on http://127.0.0.1:8000, admin on http://127.0.0.1:9901
operator page: http://127.0.0.1:9901/admin/ui#token={admin}

  curl -i http://127.0.0.1:8000/api/hello
  for i in $(seq 15); do curl -s -o /dev/null -w '%{{http_code}} ' http://127.0.0.1:8000/api/hello; done; echo
  curl -i http://127.0.0.1:8000/.env                      # suspicious path: scored, 2 hits ban
  curl -i -X POST -H 'X-Telegram-Bot-Api-Secret-Token: {bot}' -d '{{"update_id": 1}}' http://127.0.0.1:8000/bot/webhook
  curl -i -X POST -d '{{}}' http://127.0.0.1:8000/bot/webhook   # wrong secret: 403
  curl -s 'http://127.0.0.1:8000/readyz?verbose'
  curl -s http://127.0.0.1:9901/metrics | grep gateway_requests_total
  curl -s -H 'Authorization: Bearer {admin}' http://127.0.0.1:9901/admin/bans
  curl -s -H 'Authorization: Bearer {admin}' 'http://127.0.0.1:9901/admin/explain?ip=203.0.113.7&path=/api/hello'

Ctrl-C stops it.
"""


async def run_demo(*, quiet: bool = False) -> None:
    os.environ.setdefault("GATEWAY_ADMIN_TOKEN", DEMO_ADMIN_TOKEN)
    os.environ.setdefault("BOT_WEBHOOK_SECRET", DEMO_BOT_SECRET)
    text = files("gateway").joinpath("data/demo.yaml").read_text(encoding="utf-8")
    settings = load_text(text, source="demo.yaml")
    runners = []
    for app, port in ((api_app(), 18080), (bot_app(), 18081)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    gateway = Gateway(settings)
    await gateway.start()
    if not quiet:
        print(
            CURLS.format(
                bot=os.environ["BOT_WEBHOOK_SECRET"], admin=os.environ["GATEWAY_ADMIN_TOKEN"]
            ),
            flush=True,
        )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gateway.request_stop)
    await gateway._stopping.wait()
    await gateway.drain()
    for runner in runners:
        await runner.cleanup()
