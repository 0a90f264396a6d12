"""The proxy port's Python work per request, in one process, without sockets.

    .venv/bin/python bench/inprocess.py [--config bench/gateway-memory.yaml]
        [--connections 50] [--samples 30] [--batches 200] [--post] [--observability]

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

``--observability`` adds, in the same run, pipelines that differ from ``pipeline`` in one
thing each (the config's other settings as they are):

* ``no-tracing``: no trace context at all (a switch of the handler that only the bench
  sets: no ``traceparent`` read or sent, no ``trace_id`` in the access log);
* ``trace-0`` / ``trace-1``: ``tracing.sample_ratio`` 0 and 1, no export;
* ``trace-1-export``: ratio 1 and ``tracing.otlp_endpoint`` to a local OTLP/HTTP sink (a
  child process, whose CPU is not counted); each of its samples ends with a flush of the
  span queue, so the SDK thread's encoding and sending of that sample's spans is counted
  in it (the queue is made large enough that none is dropped);
* ``no-window-stats``: the per-route figures of ``/admin/stats`` (``RouteSeries``) not
  recorded (a switch of the runtime that only the bench sets).

Each sample is ``--batches`` rounds of one request on each of ``--connections``
connections; the minimum and the median of ``--samples`` samples are printed, in CPU µs
per request (``time.process_time``), with the ratio pipeline / floor.  The access log
goes to /dev/null.  Redis is not exercised (its round trip is a socket by nature).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import YOUNG_GC_THRESHOLD  # noqa: E402
from gateway.config import Settings, load_file, load_text  # noqa: E402
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

    def __init__(
        self,
        server: HttpServer,
        connections: int,
        request: bytes,
        after: Callable[[], object] | None = None,
    ) -> None:
        self.request = request
        self.after = after  # run at the end of each sample, inside its CPU time
        self.clients: list[tuple[Any, ClientTransport]] = []
        for _ in range(connections):
            protocol = server()
            transport = ClientTransport()
            protocol.connection_made(transport)
            self.clients.append((protocol, transport))

    async def round(self) -> None:
        wanted = []
        for protocol, transport in self.clients:
            wanted.append(transport.writes + 1)
            protocol.data_received(self.request)
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
        if self.after is not None:
            self.after()
        return (time.process_time() - t0) / (batches * len(self.clients)) * 1e6


# An OTLP/HTTP sink in a child process: every POST answered 200 with an empty (valid)
# ExportTraceServiceResponse, nothing decoded.
_SINK = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", _SINK, str(port)])
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1/traces"
    finally:
        proc.terminate()
        proc.wait(5)


def _variant(config: Path, tracing: dict[str, Any]) -> Settings:
    """The config with its ``tracing`` section replaced."""
    data = yaml.safe_load(config.read_text()) or {}
    data["tracing"] = tracing
    return load_text(yaml.safe_dump(data), source=str(config))


def pipeline_server(
    settings: Settings, devnull: Any, connections: int, loop: asyncio.AbstractEventLoop
) -> tuple[HttpServer, ProxyHandler]:
    """The proxy port's server with the full pipeline of ``settings``, its upstream pool
    filled with ``connections`` in-memory connections."""
    rt = Runtime(settings)
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
    name = next(iter(rt.upstreams))
    _fill_pool(rt.upstreams[name].client._pool, connections, loop)
    served: Any = handler  # it also answers upgrades, which HttpServer's type leaves out
    server = HttpServer(
        served,
        upgrade_server=upgrades,
        answer_now=handler.answer_now,
        client_timeout_s=req.client_timeout_s,
        max_header_bytes=req.max_header_bytes,
        rid_header=req.request_id_header,
        response_headers=lambda: rt.snapshot.response_headers,
    )
    return server, handler


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    config = Path(args.config)
    settings = load_file(config)
    devnull = Path(os.devnull).open("wb")  # noqa: SIM115 - open for the whole run
    stack = contextlib.ExitStack()
    request = POST if args.post else REQUEST
    server, handler = pipeline_server(settings, devnull, args.connections, loop)
    # the floor: the same server and pool code, a handler that only forwards
    name = next(iter(settings.config.upstreams))
    floor_pool = LeanPool(
        URL(settings.config.upstreams[name].url),
        limit=args.connections,
        connect_timeout_s=1,
        timeout_s=30,
    )
    _fill_pool(floor_pool, args.connections, loop)
    forward: Any = floor_handler(floor_pool)
    floor = HttpServer(
        forward,
        upgrade_server=server.upgrade_server,
        answer_now=handler.answer_now,
        client_timeout_s=settings.config.request.client_timeout_s,
        max_header_bytes=settings.config.request.max_header_bytes,
        rid_header=settings.config.request.request_id_header,
        response_headers=lambda: handler.rt.snapshot.response_headers,
    )
    rigs = {"pipeline": Rig(server, args.connections, request)}
    handlers = [handler]
    if args.observability:
        # the span queue holds a whole sample's spans: none dropped, all counted
        queue = max(2048, args.batches * args.connections * 2)
        os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(queue))
        sink = stack.enter_context(otlp_sink())
        variants = {
            "no-tracing": settings,
            "trace-0": _variant(config, {"sample_ratio": 0.0}),
            "trace-1": _variant(config, {"sample_ratio": 1.0}),
            # the budget of spans a second lifted: the cost of each span, all exported
            "trace-1-export": _variant(
                config,
                {"sample_ratio": 1.0, "otlp_endpoint": sink, "max_spans_per_s": 10_000_000},
            ),
            "no-window-stats": settings,
        }
        for key, variant in variants.items():
            srv, h = pipeline_server(variant, devnull, args.connections, loop)
            handlers.append(h)
            if key == "no-tracing":
                h.tracing = False
            if key == "no-window-stats":
                h.rt.window_stats = False
            spans = h.rt.spans
            after = None
            if spans is not None:
                after = spans._processor.force_flush
            rigs[key] = Rig(srv, args.connections, request, after)
    rigs["floor"] = Rig(floor, args.connections, request)
    for rig in rigs.values():  # warm-up: pools, caches, the interpreter's specialisation
        for _ in range(args.batches):
            await rig.round()
        if rig.after is not None:
            rig.after()
    gc.collect()
    gc.freeze()  # as `gateway serve` does
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    results: dict[str, list[float]] = {k: [] for k in rigs}
    measured = {args.only: rigs[args.only]} if args.only else rigs
    for _ in range(args.samples):
        for key, rig in measured.items():
            results[key].append(await rig.sample(args.batches))
    if args.only:  # under valgrind: the instructions are counted outside
        print(f"{args.only}: {args.samples * args.batches * args.connections} requests")
        for h in handlers:
            await h.rt.close()
        stack.close()
        devnull.close()
        return
    what = "POST, 200-byte body" if args.post else "GET"
    print(f"config {args.config}; {what}; {args.connections} connections; {args.samples} samples")
    print("| handler | min µs/req | median µs/req |")
    print("|---|--:|--:|")
    for key, values in results.items():
        print(f"| {key} | {min(values):.2f} | {statistics.median(values):.2f} |")
    ratio = min(results["pipeline"]) / min(results["floor"])
    print(f"\npipeline / floor (min): {ratio:.2f}x")
    if args.observability:
        base = min(results["pipeline"])
        print(
            "\nagainst pipeline (min): "
            + ", ".join(
                f"{key} {min(results[key]) - base:+.2f} µs"
                for key in rigs
                if key not in ("pipeline", "floor")
            )
        )
    for h in handlers:
        await h.rt.close()
    stack.close()
    devnull.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "bench" / "gateway-memory.yaml"))
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--post", action="store_true", help="a POST with a 200-byte body")
    p.add_argument(
        "--observability",
        action="store_true",
        help="also the pipeline without trace context, at sample ratios 0 and 1 (with and "
        "without OTLP export), and without the per-route figures",
    )
    p.add_argument(
        "--only",
        metavar="HANDLER",
        help="warm every handler up, then sample this one alone and print no figures: for "
        "counting instructions with valgrind (bench/README.md)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
