"""The upgrade protocol of the proxy port: aiohttp's low-level server with the gateway's limits.

The proxy port is served by :mod:`gateway.downstream.protocol`; a request asking for a
protocol upgrade (a WebSocket) or a CONNECT is handed, bytes and all, to this protocol on the same
connection, so WebSockets keep aiohttp's implementation.

aiohttp's own limits are not the contract's (SPEC section 8): this module sets the
parser's header limits from ``request.max_header_bytes``, answers a client that has not
sent its request within ``client_timeout_s`` with a 408, turns parser errors into
problem+json (431 for oversized headers), and gives each request a ``_prepare_hook`` that
adds the request id and security headers and removes the server banner on every
response, streamed or not.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.core.client_ip import IPAddress, peer_of
from gateway.core.framing import FramingError, request_host
from gateway.downstream.live import Fixed, Live
from gateway.downstream.messages import Response, to_web
from gateway.lifecycle import Lifecycle
from gateway.problem import CONTENT_TYPE, problem_body, raw_problem, server_error_answer

if TYPE_CHECKING:
    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.http_parser import RawRequestMessage
    from aiohttp.streams import StreamReader

    from gateway.downstream.live import AnswerHeaders

_log = logging.getLogger("gateway.downstream.upgrade")


class GatewayRequest(BaseRequest):
    """A request carrying the gateway's per-request state."""

    ATTRS = BaseRequest.ATTRS | frozenset(
        ["rid", "response_headers", "https", "extra_headers", "stream", "pending_record"]
    )
    rid: str | None
    pending_record: object | None
    response_headers: AnswerHeaders | None
    https: bool
    extra_headers: list[tuple[str, str]] | None
    server: GatewayServer
    stream: web.StreamResponse | None

    @property
    def header_bytes(self) -> int:
        return sum(len(k) + len(v) + 4 for k, v in self.raw_headers)

    # what the pipeline reads of a request (gateway.pipeline.request.PipelineRequest)
    fields_decoded = True  # aiohttp decoded the field values as UTF-8

    @property
    def header_fields(self) -> list[tuple[str, str]]:
        return list(self.headers.items())

    def peer_address(self) -> tuple[IPAddress | None, str]:
        # the server makes GatewayProtocol connections only; it parsed the peer once
        return cast("GatewayProtocol", self.protocol).peer_address()

    def target_host(self) -> str | None:
        """The host of an upgrade request (its head passed the framing rules already, in
        the HTTP/1.1 server, before it was handed over)."""
        version = self.version
        try:
            return request_host(
                f"{version.major}.{version.minor}",
                self.headers.getall(hdrs.HOST, []),
                self.raw_path,
            )
        except FramingError:
            return None

    def lean_body(self) -> None:
        return None  # aiohttp's reader

    def websocket_request(self) -> web.BaseRequest:
        return self

    async def send_continue(self) -> None:
        await self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def start_stream(
        self, status: int, reason: str | None, headers: list[tuple[str, str]]
    ) -> Response:
        resp = web.StreamResponse(status=status, reason=reason)
        resp.headers.extend(headers)
        self.stream = resp
        await resp.prepare(self)
        return Response(status, reason, headers, None)

    async def write(self, data: bytes) -> None:
        if self.stream is not None:
            await self.stream.write(data)

    async def write_eof(self) -> None:
        if self.stream is not None:
            await self.stream.write_eof()

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if self.server.draining:
            response.force_close()  # finish this exchange, then close the connection
        rh = self.response_headers
        if rh is not None:
            rh.apply(response.headers, self.rid, secure=self.https)
        extra = self.extra_headers
        if extra:
            for name, value in extra:
                response.headers[name] = value


def _init_state(req: GatewayRequest, server: GatewayServer) -> GatewayRequest:
    req.server = server
    req.rid = None
    req.response_headers = None
    req.https = False
    req.extra_headers = None
    req.stream = None
    req.pending_record = None
    return req


class GatewayProtocol(RequestHandler):
    """aiohttp's request handler with a request-head deadline (408) and problem+json errors."""

    __slots__ = ("_head_timer", "_server", "peer")

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._head_timer: asyncio.TimerHandle | None = None
        # (address, its text) of the peer, parsed once per connection
        self.peer: tuple[IPAddress | None, str] | None = None

    def peer_address(self) -> tuple[IPAddress | None, str]:
        peer = self.peer
        if peer is None:
            peer = self.peer = peer_of(self.transport)
        return peer

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._request_in_progress and data:
            self._head_timer = self._loop.call_later(
                self._server.live().client_timeout_s, self._head_timeout
            )
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def busy(self) -> bool:
        """A request is being handled or waits in the queue."""
        return bool(self._request_in_progress or self._messages)

    def close_if_idle(self) -> None:
        if not self.busy():
            self.close()

    def request_started(self) -> None:
        """Called once the request head is in: the head deadline is met."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or self._request_in_progress:
            return
        server = self._server
        live = server.live()
        transport.write(
            raw_problem(
                408,
                "the request was not received in time",
                rid_header=live.rid_header,
                static_headers=live.response_headers.static_block(),
            )
        )
        server.on_parser_error(self, 408)
        self.force_close()
        transport.close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # noqa: ARG002 - aiohttp's signature
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            msg = "response already started"
            raise ConnectionError(msg)
        status, detail = server_error_answer(status, exc)
        if status >= 500:  # a bug of ours: worth its traceback
            self.log_exception("Error handling request", exc_info=exc)
        rid = secrets.token_hex(16)
        resp = web.Response(
            status=status,
            body=problem_body(status, detail, request_id=rid),
            content_type=CONTENT_TYPE,
        )
        resp.force_close()
        if isinstance(request, GatewayRequest):
            request.rid = rid
            self._server.prepare_error_request(request)
        self._server.on_parser_error(self, status)
        return resp


Handler = Callable[[GatewayRequest], Awaitable[web.StreamResponse | Response]]


def _record(
    finished: Callable[[GatewayRequest, web.StreamResponse | Response | None], None],
    request: GatewayRequest,
    resp: web.StreamResponse | Response | None,
) -> None:
    """The handler's bookkeeping; a fault there costs neither the answer nor the
    exception being handled, as on the proxy port's own server."""
    try:
        finished(request, resp)
    except Exception:
        _log.exception("error recording a request")


class GatewayServer(web.Server):
    """Low-level server making :class:`GatewayProtocol` and :class:`GatewayRequest`."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int,
        live: Callable[[], Live] | None = None,
        lifecycle: Lifecycle | None = None,
        client_timeout_s: float = 60.0,
        static_headers: str = "",
        rid_header: str = "X-Request-ID",
        prepare_error_request: Callable[[GatewayRequest], None] | None = None,
        on_parser_error: Callable[[GatewayProtocol, int], None] | None = None,
        finished: Callable[[GatewayRequest, web.StreamResponse | Response | None], None]
        | None = None,
        **kwargs: Any,
    ) -> None:
        async def handle(request: GatewayRequest) -> web.StreamResponse:
            protocol: GatewayProtocol = request.protocol  # type: ignore[assignment]
            protocol.request_started()  # the head is in: its deadline is met
            try:
                resp = await handler(request)
            except BaseException:
                if finished is not None:  # an answer cut short (either side gone)
                    _record(finished, request, None)
                raise
            if finished is not None:  # (aiohttp writes the answer once this returns)
                # None: the client left before its answer could go out (a WebSocket's
                # is out, and its connection closed, once it returns)
                gone = request.transport is None and not (
                    isinstance(resp, web.StreamResponse) and resp.prepared
                )
                _record(finished, request, None if gone else resp)
            if isinstance(resp, Response) and resp.body is None and request.stream is not None:
                return request.stream  # streamed already
            return to_web(resp)

        super().__init__(
            handle,  # type: ignore[arg-type]
            request_factory=self._make_gateway_request,
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
            max_headers=256,
            access_log=None,
            keepalive_timeout=75,
            **kwargs,
        )
        if live is None:
            fixed = Fixed(
                client_timeout_s=client_timeout_s,
                body_idle_s=0.0,  # (not read here: aiohttp bounds its own writes)
                rid_header=rid_header,
                static_headers=static_headers,
            )
            live = lambda: fixed  # noqa: E731 - the same values for ever
        # the current snapshot (the runtime's): read where a request starts, never copied
        self.live = live
        self.lifecycle = lifecycle or Lifecycle()  # the process's draining flag
        self._prepare_error = prepare_error_request or (lambda _r: None)
        self._on_parser_error = on_parser_error or (lambda _p, _s: None)

    def in_flight(self) -> int:
        return sum(1 for c in self._connections if isinstance(c, GatewayProtocol) and c.busy())

    @property
    def draining(self) -> bool:
        return self.lifecycle.draining

    def start_draining(self) -> None:
        """No more keep-alive: idle connections close now, busy ones after their response."""
        self.lifecycle.start_draining()
        for conn in list(self._connections):
            if isinstance(conn, GatewayProtocol):
                conn.close_if_idle()

    def prepare_error_request(self, request: GatewayRequest) -> None:
        self._prepare_error(request)

    def on_parser_error(self, protocol: GatewayProtocol, status: int) -> None:
        self._on_parser_error(protocol, status)

    def _make_gateway_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> BaseRequest:
        return _init_state(
            GatewayRequest(message, payload, protocol, writer, task, self._loop), self
        )

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)
