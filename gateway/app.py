"""The gateway process: both ports, the reload triggers and the shutdown order.

Startup: runtime (stores, health checks) -> proxy port -> admin port -> config watcher.
Shutdown on SIGTERM (SPEC section 7), in this order:

1. ``/readyz`` answers 503 at once (the kubelet takes the pod out of the Service);
2. requests keep being served for ``drain.delay_s`` (endpoints propagate meanwhile);
3. the proxy listener closes: no new connections; idle keep-alive ones are closed;
4. open WebSockets are closed with 1001 (going away);
5. in-flight requests finish, for up to ``drain.timeout_s``;
6. the admin port, the config watcher, pools and stores close; exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, web

from gateway import build_name
from gateway.admin.api import AdminRunner, create_admin_app
from gateway.core.evidence import Seen
from gateway.downstream.listen import dual_stack_socket, is_any_ipv6
from gateway.downstream.protocol import HttpProtocol
from gateway.downstream.server import HttpServer
from gateway.downstream.upgrade import GatewayProtocol, GatewayRequest, GatewayServer
from gateway.pipeline.handler import ProxyHandler
from gateway.pipeline.snapshot import NO_ROUTE
from gateway.reload import Reloader
from gateway.runtime import Runtime

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.metrics import Metrics


YOUNG_GC_THRESHOLD = 10_000  # while serving; Python's default is 700


class StartupError(Exception):
    """The gateway could not start (a port in use, an address not available)."""


class Gateway:
    """One gateway: create, ``start()``, later ``drain()``; or ``run()`` for both."""

    def __init__(
        self, settings: Settings, *, config_path: str | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.runtime = Runtime(settings, metrics=metrics)
        self.reloader = Reloader(self.runtime, config_path)
        self._proxy_listener: asyncio.Server | None = None
        self._proxy_server: HttpServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        # SIGHUP reloads under way: the loop keeps only a weak reference to a task
        self._reloads: set[asyncio.Task[tuple[bool, list[str]]]] = set()
        self.proxy_port: int | None = None
        self.admin_port: int | None = None

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Start both ports; a port that cannot be bound raises :class:`StartupError`."""
        try:
            await self._start()
        except OSError as exc:
            self.runtime.log.error("listen_failed", error=str(exc))  # noqa: TRY400 - no traceback needed
            if self._proxy_listener is not None:
                self._proxy_listener.close()
            if self._proxy_server is not None:
                self._proxy_server.close()
            if self._admin_runner is not None:
                await self._admin_runner.cleanup()
            await self.runtime.close()
            msg = f"cannot listen: {exc}"
            raise StartupError(msg) from exc

    async def _start(self) -> None:
        rt = self.runtime
        cfg = self.settings.config
        rt.metrics.config_last_reload_success.set(time.time())
        rt.metrics.config_last_reload_successful.set(1)
        await rt.start()
        handler = ProxyHandler(rt)
        # The servers read the current snapshot where a request starts (its head deadline,
        # the idle bound on a client not reading, the answers they write themselves), so
        # a reload reaches them with nothing copied; the header bound needs a restart.
        max_header_bytes = cfg.request.max_header_bytes
        upgrades = GatewayServer(
            handler,
            max_header_bytes=max_header_bytes,
            live=lambda: rt.snapshot,
            lifecycle=rt.lifecycle,
            prepare_error_request=self._prepare_error_request,
            on_parser_error=self._on_parser_error,
            finished=handler.finished,
        )
        server = HttpServer(
            handler,  # type: ignore[arg-type]
            upgrade_server=upgrades,
            answer_now=handler.answer_now,
            finished=handler.finished,
            max_header_bytes=max_header_bytes,
            live=lambda: rt.snapshot,
            lifecycle=rt.lifecycle,
            on_parser_error=self._on_parser_error,
            response_headers=lambda: rt.snapshot.response_headers,
        )
        self._proxy_server = server
        loop = asyncio.get_running_loop()
        if is_any_ipv6(cfg.listen.host):
            self._proxy_listener = await loop.create_server(
                server.protocol_factory, sock=dual_stack_socket(cfg.listen.port), backlog=1024
            )
        else:
            self._proxy_listener = await loop.create_server(
                server.protocol_factory,
                cfg.listen.host,
                cfg.listen.port,
                reuse_address=True,
                backlog=1024,
            )
        sock = self._proxy_listener.sockets[0]
        self.proxy_port = int(sock.getsockname()[1])

        admin_app = create_admin_app(rt, self.reloader)
        # no admin endpoint reads a body: one in a coding is never inflated (a bad one made
        # aiohttp log a traceback as it drained it)
        self._admin_runner = AdminRunner(
            admin_app, handle_signals=False, access_log=None, auto_decompress=False
        )
        await self._admin_runner.setup()
        admin_site: web.BaseSite
        if is_any_ipv6(cfg.admin.host):
            admin_site = web.SockSite(self._admin_runner, dual_stack_socket(cfg.admin.port))
        else:
            admin_site = web.TCPSite(
                self._admin_runner, cfg.admin.host, cfg.admin.port, reuse_address=True
            )
        await admin_site.start()
        self.admin_port = _bound_port(self._admin_runner, cfg.admin.port)
        await self.reloader.start()
        rt.log.info("config_summary", build=build_name(), **self.settings.summary())

    def _prepare_error_request(self, request: GatewayRequest) -> None:
        request.response_headers = self.runtime.snapshot.response_headers

    def _on_parser_error(self, protocol: GatewayProtocol | HttpProtocol, status: int) -> None:
        rt = self.runtime
        rt.count_request(NO_ROUTE, "OTHER", status, 0.0)
        snap = rt.snapshot
        ip, text = protocol.peer_address()
        if (
            snap.abuse_enabled
            and ip is not None
            and not (snap.allow and ip in snap.allow)
            and rt.allow.covers(ip) is None
        ):
            rt.bans.report(snap.ip_key(ip, text), "bad_request", Seen(status=status))

    # ------------------------------------------------------------------ stop

    def request_stop(self) -> None:
        # /readyz turns 503 the moment the signal is handled, before the drain task runs:
        # probes are answered from the parsing callback and would otherwise race it
        self.runtime.lifecycle.stop()
        self._stopping.set()

    async def drain(self) -> None:
        rt = self.runtime
        cfg = rt.settings.config
        rt.lifecycle.stop()
        rt.log.info("drain_started", delay_s=cfg.drain.delay_s, timeout_s=cfg.drain.timeout_s)
        started = time.monotonic()
        await asyncio.sleep(cfg.drain.delay_s)
        server = self._proxy_server
        if self._proxy_listener is not None and server is not None:
            # Stop accepting (a client that reconnects on 1001 must not get a new
            # WebSocket), close the WebSockets, then let what is in flight finish,
            # request bodies included.
            self._proxy_listener.close()
            server.start_draining()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + cfg.drain.timeout_s
            await self._close_websockets()
            while server.in_flight() and loop.time() < deadline:  # a count, polled
                if rt.websockets:  # upgraded meanwhile on a connection already open
                    await self._close_websockets()
                await asyncio.sleep(0.02)
            await server.shutdown(1.0)
            # at least a moment: aiohttp reads a timeout of 0 as none, and would wait for
            # an upgraded connection's handler (a WebSocket) without end
            await server.upgrade_server.shutdown(max(0.05, min(1.0, deadline - loop.time())))
        else:
            await self._close_websockets()
        await self.reloader.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await rt.close()
        rt.log.info("drain_finished", duration_s=round(time.monotonic() - started, 3))

    async def _close_websockets(self) -> None:
        """All at once, each bounded: a client that reads nothing cannot hold the drain."""
        await self.runtime.websockets.close_all(WSCloseCode.GOING_AWAY, "gateway shutting down")

    def _reload_on_signal(self) -> None:
        task = asyncio.ensure_future(self.reloader.reload("sighup"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT (SIGHUP reloads), drain, return."""
        loop = asyncio.get_running_loop()
        await self.start()
        # What exists once started (modules, config, pools) lives as long as the process:
        # keep it out of the cyclic collector's full passes, which otherwise walk all of
        # it and stall the loop under load (the tail latency shows each such pass).
        gc.collect()
        gc.freeze()
        # A young-generation pass every YOUNG_GC_THRESHOLD net new container objects
        # rather than 700: at the default a saturated proxy makes one every few requests,
        # a share of its CPU that bench/inprocess.py shows. A pass over that many young
        # objects stays short, and what a request allocates is freed with it.
        gc_threshold = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc_threshold[1:])
        lifecycle = self.runtime.lifecycle

        def on_stop(_signum: int, _frame: object) -> None:
            # A Python-level handler runs at the next bytecode, even inside a callback of
            # the loop's current round: a probe answered from its parsing callback right
            # after the signal already sees the drain (a loop signal handler would run
            # only after that round's I/O callbacks).
            lifecycle.stop()
            loop.call_soon_threadsafe(self.request_stop)

        previous = {sig: signal.signal(sig, on_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        try:
            try:
                await self._stopping.wait()
            finally:  # a second SIGTERM/SIGINT during the drain acts as it did before
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            await self.drain()
        finally:
            gc.set_threshold(*gc_threshold)


def _bound_port(runner: web.BaseRunner, default: int) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return default
