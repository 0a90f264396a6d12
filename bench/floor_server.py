"""The forwarding-only floor as a real server, for bench/run.py's ``gw-floor`` target.

    .venv/bin/python bench/floor_server.py --port P --upstream http://127.0.0.1:U

The gateway's own server (llhttp parsing, the answer's writing, keep-alive) and its
upstream pool, on real sockets under uvloop, with the handler of ``inprocess.py``'s
``floor`` rig: it forwards the request and answers with the upstream's answer, nothing
else (no limits, identity, trace context, security headers, metrics or access log).
What this costs is the part of the gateway's cost that its pipeline does not decide:
the design's floor, measured beside nginx and the full pipeline in the same run. It
runs from the checkout on ``sys.path`` (bench/run.py hands it the compiled copy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop
from yarl import URL

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from inprocess import serving, settings_of  # noqa: E402 - beside this script

from gateway.app import YOUNG_GC_THRESHOLD  # noqa: E402
from gateway.downstream.messages import Request, Response  # noqa: E402
from gateway.upstream.pool import LeanPool  # noqa: E402

# the answer's framing is the server's own: the upstream's framing fields are not passed on
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive"))

_CONFIG = {
    "listen": {"host": "127.0.0.1", "port": 18000},
    "upstreams": {"api": {"url": "http://127.0.0.1:18080"}},
    "routes": [{"name": "api", "path_prefix": "/", "upstream": "api"}],
    "access_log": {"enabled": False},
}


def floor_handler(pool: LeanPool) -> Callable[[Request], Awaitable[Response]]:
    """Forward, answer with the upstream's status, fields (less its framing) and body."""

    async def handle(request: Request) -> Response:
        resp = await pool.request(
            request.method, request.raw_path, list(request.headers.items()), None, chunked=False
        )
        try:
            fields = [f for f in resp.header_list if f[0].lower() not in _FRAMING]
            return Response(resp.status, resp.reason, fields, resp.body_if_complete() or b"")
        finally:
            resp.release()

    return handle


async def serve(port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    cfg = {**_CONFIG, "upstreams": {"api": {"url": upstream}}}
    settings = settings_of(cfg, "floor")
    # the server as the gateway makes it; the pipeline it is made with is never called
    server_for, handler = serving(settings, 0, loop)
    pool = LeanPool(URL(upstream), limit=1024, connect_timeout_s=1, timeout_s=30)
    factory = server_for(floor_handler(pool)).protocol_factory
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=4096)
    # as the gateway does once started (gateway/app.py)
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    with contextlib.suppress(Exception):
        await handler.rt.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int)
    p.add_argument("--upstream", help="the upstream's URL")
    p.add_argument("--which", action="store_true", help="print the gateway package run")
    args = p.parse_args()
    if args.which:
        import gateway  # noqa: PLC0415 - the package inprocess.py put on sys.path

        print(gateway.__file__)
        return 0
    if args.port is None or args.upstream is None:
        p.error("--port and --upstream are required")
    with tempfile.TemporaryDirectory():
        uvloop.run(serve(args.port, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
