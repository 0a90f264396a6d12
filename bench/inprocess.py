"""The proxy port's Python work per request, in one process, without sockets.

    .venv/bin/python bench/inprocess.py [--config bench/gateway-memory.yaml]
        [--connections 50] [--samples 30] [--batches 200] [--post] [--observability]
        [--only HANDLER]

The real server protocol (``gateway.downstream.protocol``), the real pipeline (``ProxyHandler``) and
the real upstream pool drive requests over in-memory transports: a client transport
that counts answers and an upstream transport that answers each request head with a
fixed 200-byte response in the next loop turn.  No syscalls, no other process: the
figure is the gateway's own Python work, and it moves by well under 1 % between runs on
a machine where whole-server CPU figures move by 10 %.  It is what to watch when
changing the hot path.

When the config has ``identity.jwt`` (the bench config has), its ``jwks_file`` is
replaced by one made for the run (``bench_identity.py``) and every request carries that
key's token (``Authorization: Bearer``), as wrk's do in ``bench/run.py``.

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
``--only HANDLER`` warms every handler up, then samples that one alone and prints no
figures: a run for a profiler around the process. ``bench/instructions.py`` counts the
instructions of one handler's requests with valgrind, on the rigs made here.

``BENCH_GATEWAY_SOURCE``, when set, names another checkout whose ``gateway`` package
runs (with this virtualenv's dependencies): ``bench/instructions.py --source``.
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
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
# another checkout's gateway package (bench/instructions.py --source), else this one's
sys.path.insert(0, os.environ.get("BENCH_GATEWAY_SOURCE") or str(ROOT))

from bench_identity import fill_config, make_identity  # noqa: E402 - beside this script

from gateway.app import YOUNG_GC_THRESHOLD  # noqa: E402
from gateway.config import Settings, load_text  # noqa: E402
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
# the request heads without their blank line: the run's token, if any, goes before it
GET_HEAD = b"GET /api/items?id=42 HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nUser-Agent: bench\r\n"
POST_HEAD = (
    b"POST /api/items HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nUser-Agent: bench\r\n"
    b"Content-Type: application/json\r\nContent-Length: 200\r\n"
)
# the pipelines of --observability, each with one thing changed from ``pipeline``
OBSERVABILITY = ("no-tracing", "trace-0", "trace-1", "trace-1-export", "no-window-stats")


def bench_config(
    path: str, tmp: Path, key: Any = None, exp: int | None = None
) -> tuple[dict[str, Any], bytes]:
    """The config at ``path`` as data (with the run's JWKS, written under ``tmp``, when it
    has an ``identity.jwt``) and the header lines every request carries (its bearer token
    then; ``key`` and ``exp`` as for :func:`bench_identity.make_identity`)."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    extra = b""
    if (cfg.get("identity") or {}).get("jwt") is not None:
        jwks, token = make_identity(tmp, key, exp)
        fill_config(cfg, jwks)
        extra = f"Authorization: Bearer {token}\r\n".encode()
    return cfg, extra


def settings_of(cfg: dict[str, Any], source: str, **sections: Any) -> Settings:
    """``cfg`` (from :func:`bench_config`) loaded, with ``sections`` replaced."""
    return load_text(yaml.safe_dump({**cfg, **sections}, sort_keys=False), source=source)


def request_bytes(extra: bytes, *, post: bool) -> bytes:
    """The GET (or the POST with its 200-byte body) with the header lines ``extra``."""
    if post:
        return POST_HEAD + extra + b"\r\n" + b"p" * 200
    return GET_HEAD + extra + b"\r\n"


class ClientTransport(asyncio.Transport):
    """The client's side: counts what the gateway writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.closing = False
        # called on the next write, once (Rig.round when it waits for the answers)
        self.on_answer: Callable[[], None] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:  # noqa: ARG002
        self.writes += 1
        if self.on_answer is not None:
            on_answer, self.on_answer = self.on_answer, None
            on_answer()

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
        flush: Callable[[], object] | None = None,
    ) -> None:
        self.request = request
        # run at the end of each sample, inside its CPU time (a queue another thread sends)
        self.flush = flush
        self.clients: list[tuple[Any, ClientTransport]] = []
        # a round waits on a future the answers resolve instead of polling the loop: for
        # answers that wait on a socket (the redis backend), whose wait would otherwise
        # be spent in polls, counted
        self.wait_for_answers = False
        self._unanswered = 0
        self._answered: asyncio.Future[None] | None = None
        for _ in range(connections):
            protocol = server()
            transport = ClientTransport()
            protocol.connection_made(transport)
            self.clients.append((protocol, transport))

    def next_request(self) -> bytes:
        """The bytes of the next request (the same each time here)."""
        return self.request

    def _on_answer(self) -> None:
        self._unanswered -= 1
        if self._unanswered == 0 and self._answered is not None:
            self._answered.set_result(None)

    async def round(self) -> None:
        if self.wait_for_answers:
            self._answered = asyncio.get_running_loop().create_future()
            self._unanswered = len(self.clients)
            for protocol, transport in self.clients:
                transport.on_answer = self._on_answer
                protocol.data_received(self.next_request())
            async with asyncio.timeout(30):
                await self._answered
            return
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

    def drain(self) -> None:
        """What the rounds left on another thread's queue, sent (spans to export)."""
        if self.flush is not None:
            self.flush()

    async def sample(self, batches: int) -> float:
        t0 = time.process_time()
        for _ in range(batches):
            await self.round()
        self.drain()
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
    """A local OTLP/HTTP traces endpoint for the run (its URL)."""
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


def serving(
    settings: Settings, connections: int, loop: asyncio.AbstractEventLoop, log: Any = None
) -> tuple[Callable[[Any], HttpServer], ProxyHandler]:
    """The real pipeline of ``settings`` (access log to ``log``, /dev/null when None;
    ``connections`` idle upstream connections on in-memory transports), and a maker of
    servers around it or around another handler."""
    rt = Runtime(settings)
    if log is None:
        log = Path(os.devnull).open("wb")  # noqa: SIM115 - open for the whole run
    rt.access_log = AccessLog(log)
    handler = ProxyHandler(rt)
    req = settings.config.request
    # the record after the answer's write, where the checkout run has it (--source: an
    # older one records inside the handler)
    finished = getattr(handler, "finished", None)
    after: dict[str, Any] = {"finished": finished} if finished is not None else {}
    upgrades = GatewayServer(
        handler,
        client_timeout_s=req.client_timeout_s,
        max_header_bytes=req.max_header_bytes,
        static_headers="",
        rid_header=req.request_id_header,
        prepare_error_request=lambda *_: None,
        on_parser_error=lambda *_: None,
        **after,
    )

    def server_for(h: Any) -> HttpServer:
        return HttpServer(
            h,
            upgrade_server=upgrades,
            answer_now=handler.answer_now,
            **(after if h is handler else {}),  # (not the floor's)
            client_timeout_s=req.client_timeout_s,
            max_header_bytes=req.max_header_bytes,
            rid_header=req.request_id_header,
            response_headers=lambda: rt.snapshot.response_headers,
        )

    _fill_pool(next(iter(rt.upstreams.values())).client._pool, connections, loop)
    return server_for, handler


async def make_rigs(
    config: str,
    connections: int,
    stack: contextlib.AsyncExitStack,
    *,
    post: bool = False,
    observability: bool = False,
    spans_per_flush: int = 0,
    key: Any = None,
    exp: int | None = None,
) -> dict[str, Rig]:
    """The rigs on the config at ``config``: ``pipeline``, with ``observability`` the
    variants of :data:`OBSERVABILITY`, and ``floor``. ``stack`` closes what they hold (the
    runtimes, the access log's /dev/null, the OTLP sink); ``spans_per_flush``: the most
    spans sent between two flushes (the span queue holds them all: none is dropped);
    ``key`` and ``exp``: the run's token, as for :func:`bench_config`."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:  # the JWKS is read as the config loads
        cfg, extra = bench_config(config, Path(tmp), key, exp)
        settings = settings_of(cfg, config)
        variants: dict[str, Settings] = {}
        if observability:
            os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(max(2048, spans_per_flush)))
            sink = stack.enter_context(otlp_sink())
            variants = {
                "no-tracing": settings,
                "trace-0": settings_of(cfg, config, tracing={"sample_ratio": 0.0}),
                "trace-1": settings_of(cfg, config, tracing={"sample_ratio": 1.0}),
                # the budget of spans a second lifted: the cost of each span, all exported
                "trace-1-export": settings_of(
                    cfg,
                    config,
                    tracing={
                        "sample_ratio": 1.0,
                        "otlp_endpoint": sink,
                        "max_spans_per_s": 10_000_000,
                    },
                ),
                "no-window-stats": settings,
            }
    log = stack.enter_context(Path(os.devnull).open("wb"))  # noqa: SIM115 - the stack's
    request = request_bytes(extra, post=post)
    tweaks: dict[str, Callable[[ProxyHandler], object]] = {
        "no-tracing": lambda h: setattr(h, "tracing", False),
        "no-window-stats": lambda h: setattr(h.rt, "window_stats", False),
    }
    rigs: dict[str, Rig] = {}
    servers = []
    for name, variant in {"pipeline": settings, **variants}.items():
        server_for, handler = serving(variant, connections, loop, log)
        stack.push_async_callback(handler.rt.close)
        servers.append(server_for)
        if name in tweaks:
            tweaks[name](handler)
        spans = getattr(handler.rt, "spans", None)  # None too in a checkout before tracing
        flush = spans._processor.force_flush if spans is not None else None
        rigs[name] = Rig(server_for(handler), connections, request, flush)
    # the floor: the same server and pool code, a handler that only forwards
    upstream = next(iter(settings.config.upstreams.values()))
    floor_pool = LeanPool(URL(upstream.url), limit=connections, connect_timeout_s=1, timeout_s=30)
    _fill_pool(floor_pool, connections, loop)
    rigs["floor"] = Rig(servers[0](floor_handler(floor_pool)), connections, request)
    return rigs


async def warm_up(rigs: Iterable[Rig], rounds: int) -> None:
    """``rounds`` on each rig (pools, caches, the interpreter's specialisation), then the
    collector as the gateway runs it."""
    for rig in rigs:
        for _ in range(rounds):
            await rig.round()
        rig.drain()
    gc.collect()
    gc.freeze()  # as `gateway serve` does
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])


async def measure(
    rigs: dict[str, Rig], batches: int, samples: int, only: str | None = None
) -> dict[str, list[float]]:
    """A warm-up round of ``batches`` on each rig, then ``samples`` samples of each (of
    ``only`` alone when given), interleaved; CPU µs per request of each sample, by rig."""
    await warm_up(rigs.values(), batches)
    sampled = {only: rigs[only]} if only else rigs
    results: dict[str, list[float]] = {k: [] for k in sampled}
    for _ in range(samples):
        for key, rig in sampled.items():
            results[key].append(await rig.sample(batches))
    return results


async def main(args: argparse.Namespace) -> None:
    async with contextlib.AsyncExitStack() as stack:
        rigs = await make_rigs(
            args.config,
            args.connections,
            stack,
            post=args.post,
            observability=args.observability or args.only in OBSERVABILITY,
            spans_per_flush=args.batches * args.connections * 2,
        )
        if args.only is not None and args.only not in rigs:
            sys.exit(f"--only: one of {', '.join(rigs)}")
        results = await measure(rigs, args.batches, args.samples, args.only)
    if args.only:
        print(f"{args.only}: {args.samples * args.batches * args.connections} requests")
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
            + ", ".join(f"{key} {min(results[key]) - base:+.2f} µs" for key in OBSERVABILITY)
        )


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
        help="warm every handler up, then sample this one alone and print no figures: a "
        "run for a profiler (one of --observability's implies it)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
