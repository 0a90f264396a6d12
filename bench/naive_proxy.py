"""The reference: the reverse proxy a Python developer would write in a few minutes.

One aiohttp ClientSession, uvloop, one catch-all handler that forwards the method,
path, headers and body and streams the response back. No limits, no security
headers, no metrics, no logs: the floor the gateway's full pipeline is compared to.

    python bench/naive_proxy.py --port 9000 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

# Framing headers aiohttp recomputes for the streamed response.
_SKIP = frozenset(("connection", "keep-alive", "transfer-encoding", "content-length", "host"))


def make_app(upstream: str) -> web.Application:
    app = web.Application()

    async def start_session(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP}
        body = request.content if request.body_exists else None
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for name, value in up.headers.items():
                if name.lower() not in _SKIP:
                    resp.headers.add(name, value)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.on_startup.append(start_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    uvloop.install()
    web.run_app(
        make_app(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
