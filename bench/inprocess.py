"""The proxy port's Python work per request, in one process, without sockets.

    .venv/bin/python bench/inprocess.py [--config bench/gateway-memory.yaml]
        [--connections 50] [--samples 30] [--batches 200]

The real server protocol (``gateway.downstream.protocol``), the real pipeline (``ProxyHandler``) and
the real upstream pool drive requests over in-memory transports: a client transport
that counts answers and an upstream transport that answers each request head with a
fixed 200-byte response in the next loop turn.  No syscalls, no other process: the
figure is the gateway's own Python work, and it moves by well under 1 % between runs on
a machine where whole-server CPU figures move by 10 %.  It is what to watch when
changing the hot path.

``--post`` sends a POST with a 200-byte body (``Content-Length``) instead of the GET:
the small-body path (read whole before the upstream is asked, sent with the head).

Two handlers run in the same process, interleaved:

* ``pipeline``: the full pipeline of ``--config`` (memory backend);
* ``floor``: the same server and upstream pool with a handler that forwards and answers,
  nothing else (the cost no pipeline step can remove).

Each sample is ``--batches`` rounds of one request on each of ``--connections``
connections; the minimum and the median of ``--samples`` samples are printed, in CPU µs
per request (``time.process_time``), with the ratio pipeline / floor.  The access log
goes to /dev/null.  Redis is not exercised (its round trip is a socket by nature).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import YOUNG_GC_THRESHOLD  # noqa: E402
from gateway.config import Settings, load_file  # noqa: E402
from gateway.downstream.messages import Request, Response  # noqa: E402
from gateway.downstream.server import HttpServer  # noqa: E402
from gateway.downstream.upgrade import GatewayServer  # noqa: E402
from gateway.logs import AccessLog  # noqa: E402
from gateway.pipeline.handler import ProxyHandler  # noqa: E402
from gateway.runtime import Runtime  # noqa: E402
from gateway.upstream.connection import UpstreamConnection  # noqa: E402
from gateway.upstream.pool import LeanPool  # noqa: E402

BODY = b"x" * 200
UPSTREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 28 Nov 2026 17:35:29 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 200\r\nConnection: keep-alive\r\n\r\n" + BODY
)
REQUEST = b"GET /api/items?id=42 HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nUser-Agent: bench\r\n\r\n"
POST = (
    b"POST /api/items HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nUser-Agent: bench\r\n"
    b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n" + b"p" * 200
)


class ClientTransport(asyncio.Transport):
    """The client's side: counts what the gateway writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:  # noqa: ARG002
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True


class UpstreamTransport(asyncio.Transport):
    """The upstream's side: every request head is answered in the next loop turn."""

    def __init__(self, conn: UpstreamConnection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.conn = conn
        self.loop = loop

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data[:5]) in (b"GET /", b"POST "):  # a request, not a piece of its body
            self.loop.call_soon(self.conn.data_received, UPSTREAM_ANSWER)

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ARG002
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _fill_pool(pool: LeanPool, n: int, loop: asyncio.AbstractEventLoop) -> None:
    """``n`` idle connections on in-memory transports (none is ever dialled)."""
    for _ in range(n):
        conn = UpstreamConnection(loop)
        conn.connection_made(UpstreamTransport(conn, loop))
        pool._idle.append(conn)
        pool._open += 1


def floor_handler(pool: LeanPool) -> Callable[[Request], Awaitable[Response]]:
    async def handle(request: Request) -> Response:
        resp = await pool.request(
            request.method, request.raw_path, list(request.headers.items()), None, chunked=False
        )
        try:
            body = resp.body_if_complete() or b""
            return Response(resp.status, resp.reason, resp.header_list, body)
        finally:
            resp.release()

    return handle


class Rig:
    """One server with its connections, driven a round at a time."""

    def __init__(self, server: HttpServer, connections: int, request: bytes) -> None:
        self.request = request
        self.clients: list[tuple[Any, ClientTransport]] = []
        for _ in range(connections):
            protocol = server()
            transport = ClientTransport()
            protocol.connection_made(transport)
            self.clients.append((protocol, transport))

    def next_request(self) -> bytes:
        """The bytes of the next request (the same each time here)."""
        return self.request

    async def round(self) -> None:
        wanted = []
        for protocol, transport in self.clients:
            wanted.append(transport.writes + 1)
            protocol.data_received(self.next_request())
        for _ in range(50):
            await asyncio.sleep(0)
            if all(t.writes >= w for (_, t), w in zip(self.clients, wanted, strict=True)):
                return
        msg = "requests were not answered: is the upstream pool full?"
        raise RuntimeError(msg)

    async def sample(self, batches: int) -> float:
        t0 = time.process_time()
        for _ in range(batches):
            await self.round()
        return (time.process_time() - t0) / (batches * len(self.clients)) * 1e6


def serving(
    settings: Settings, connections: int, loop: asyncio.AbstractEventLoop
) -> tuple[Callable[[Any], HttpServer], ProxyHandler]:
    """The real pipeline of ``settings`` (access log to /dev/null, ``connections`` idle
    upstream connections on in-memory transports), and a maker of servers around it or
    around another handler."""
    rt = Runtime(settings)
    devnull = Path(os.devnull).open("wb")  # noqa: SIM115 - open for the whole run
    rt.access_log = AccessLog(devnull)
    handler = ProxyHandler(rt)
    req = settings.config.request
    upgrades = GatewayServer(
        handler,
        client_timeout_s=req.client_timeout_s,
        max_header_bytes=req.max_header_bytes,
        static_headers="",
        rid_header=req.request_id_header,
        prepare_error_request=lambda *_: None,
        on_parser_error=lambda *_: None,
    )

    def server_for(h: Any) -> HttpServer:
        return HttpServer(
            h,
            upgrade_server=upgrades,
            answer_now=handler.answer_now,
            client_timeout_s=req.client_timeout_s,
            max_header_bytes=req.max_header_bytes,
            rid_header=req.request_id_header,
            response_headers=lambda: rt.snapshot.response_headers,
        )

    _fill_pool(next(iter(rt.upstreams.values())).client._pool, connections, loop)
    return server_for, handler


async def measure(rigs: dict[str, Rig], batches: int, samples: int) -> dict[str, list[float]]:
    """A warm-up round of ``batches`` on each rig, then ``samples`` samples of each,
    interleaved; CPU µs per request of each sample, by rig."""
    for rig in rigs.values():  # warm-up: pools, caches, the interpreter's specialisation
        for _ in range(batches):
            await rig.round()
    gc.collect()
    gc.freeze()  # as `gateway serve` does
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    results: dict[str, list[float]] = {k: [] for k in rigs}
    for _ in range(samples):
        for key, rig in rigs.items():
            results[key].append(await rig.sample(batches))
    return results


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    settings = load_file(args.config)
    server_for, handler = serving(settings, args.connections, loop)
    name = next(iter(settings.config.upstreams))
    floor_pool = LeanPool(
        URL(settings.config.upstreams[name].url),
        limit=args.connections,
        connect_timeout_s=1,
        timeout_s=30,
    )
    _fill_pool(floor_pool, args.connections, loop)
    request = POST if args.post else REQUEST
    rigs = {
        "pipeline": Rig(server_for(handler), args.connections, request),
        "floor": Rig(server_for(floor_handler(floor_pool)), args.connections, request),
    }
    results = await measure(rigs, args.batches, args.samples)
    what = "POST, 200-byte body" if args.post else "GET"
    print(f"config {args.config}; {what}; {args.connections} connections; {args.samples} samples")
    print("| handler | min µs/req | median µs/req |")
    print("|---|--:|--:|")
    for key, values in results.items():
        print(f"| {key} | {min(values):.2f} | {statistics.median(values):.2f} |")
    ratio = min(results["pipeline"]) / min(results["floor"])
    print(f"\npipeline / floor (min): {ratio:.2f}x")
    handler.rt.access_log.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "bench" / "gateway-memory.yaml"))
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--post", action="store_true", help="a POST with a 200-byte body")
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
