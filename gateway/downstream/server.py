"""The proxy port's server: the connections it makes, the answers it writes, the drain.

:class:`HttpServer` makes an :class:`~gateway.downstream.protocol.HttpProtocol` for each
connection and keeps the set of them: once a second it refreshes the ``Date`` header and
closes keep-alive connections idle for ``keepalive_s``; a drain closes idle ones at once
and busy ones after their answer. It renders every answer's head (the request id, the
security headers, a ``Date``; never a server banner) and writes whole answers through the
round's :class:`~gateway.batchwrite.WriteBatcher`.
"""

from __future__ import annotations

import asyncio
import email.utils
import secrets
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

from aiohttp import web

from gateway.batchwrite import SERVING, WriteBatcher
from gateway.downstream.head import HostCache
from gateway.downstream.live import Fixed, Live
from gateway.downstream.messages import (
    NO_BODY_STATUS,
    AnyResponse,
    Request,
    Response,
    from_web,
    status_line,
)
from gateway.downstream.protocol import HttpProtocol
from gateway.lifecycle import Lifecycle
from gateway.memtrim import ReleaseAfterBurst
from gateway.problem import CONTENT_TYPE, problem_body

if TYPE_CHECKING:
    from gateway.downstream.live import AnswerHeaders
    from gateway.downstream.upgrade import GatewayServer

__all__ = ["Handler", "HttpServer"]

_ONE_WRITE: Final = 16 * 1024  # bodies up to this size are joined to the head

Handler = Callable[[Request], Coroutine[Any, Any, AnyResponse]]


class HttpServer:
    """Makes :class:`HttpProtocol` for each connection; tracks them for draining."""

    def __init__(
        self,
        handler: Handler,
        *,
        upgrade_server: GatewayServer,
        max_header_bytes: int,
        answer_now: Callable[[Request], AnyResponse | None] | None = None,
        finished: Callable[[Request, AnyResponse | None], None] | None = None,
        live: Callable[[], Live] | None = None,
        lifecycle: Lifecycle | None = None,
        client_timeout_s: float = 60.0,
        static_headers: str = "",
        rid_header: str = "X-Request-ID",
        on_parser_error: Callable[[Any, int], None] | None = None,
        response_headers: Callable[[], AnswerHeaders] | None = None,
        keepalive_s: float = 75.0,
        send_idle_s: float = 10.0,
    ) -> None:
        """``live`` gives the current snapshot (the runtime's); without it the server
        keeps ``client_timeout_s``, ``send_idle_s``, ``rid_header`` and ``static_headers``
        as given. ``lifecycle`` holds the process's draining flag (its own without).
        ``finished``: called with each request once it is over: with the answer its
        handler returned once that is written, or with None when it was not, or not
        whole (the client left, the handler raised, a streamed answer was cut short)."""
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.answer_now = answer_now or (lambda _r: None)
        # called once the handler's answer is written (or could not be): the handler's
        # bookkeeping that the client need not wait for
        self.finished = finished
        self.upgrade_server = upgrade_server
        self.max_header_bytes = max_header_bytes
        if live is None:
            fixed = Fixed(
                client_timeout_s=client_timeout_s,
                body_idle_s=send_idle_s,  # a client that takes no bytes that long is cut off
                rid_header=rid_header,
                static_headers=static_headers,
            )
            live = lambda: fixed  # noqa: E731 - the same values for ever
        self.live = live
        # the bound a client not reading its answers gets, read when it stalls: one
        # callable for every connection's flow control (none made per connection)
        self.body_idle_s: Callable[[], float] = lambda: self.live().body_idle_s
        self.lifecycle = lifecycle or Lifecycle()
        self._on_parser_error = on_parser_error or (lambda _p, _s: None)
        self._response_headers = response_headers
        self.keepalive_s = keepalive_s
        self.connections: set[HttpProtocol] = set()
        self.hosts = HostCache()  # the host of each Host value, shared by the connections
        # whole answers, sent at the end of a round (at once when alone)
        self.batcher = WriteBatcher(self.loop, SERVING)
        self.date = b""
        self._tick: asyncio.TimerHandle | None = None
        self.memory = ReleaseAfterBurst()
        self._tick_date()

    def __call__(self) -> HttpProtocol:
        return HttpProtocol(self)

    @property
    def protocol_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        """What ``loop.create_server`` takes: this server, whose connections are
        protocols by their methods (:class:`HttpProtocol` derives from no asyncio class)."""
        return cast("Callable[[], asyncio.BaseProtocol]", self)

    @property
    def draining(self) -> bool:
        return self.lifecycle.draining

    # ------------------------------------------------------------------ housekeeping

    def _tick_date(self) -> None:
        """Refresh the Date header and close idle keep-alive connections (once a second)."""
        self.date = b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"
        now = self.loop.time()
        for conn in list(self.connections):
            if not conn.busy() and now - conn.idle_since > self.keepalive_s:
                conn.close()
            else:
                conn.shed_idle()
        self.memory.sample(len(self.connections))
        self._tick = self.loop.call_later(1.0, self._tick_date)

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for conn in list(self.connections):
            conn.close()

    async def shutdown(self, timeout_s: float) -> None:
        """:meth:`close`, and cancel the requests still being served (the drain is over:
        what they use, upstream pools included, is about to close)."""
        tasks = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        self.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def in_flight(self) -> int:
        return sum(1 for c in self.connections if c.busy()) + self.upgrade_server.in_flight()

    def start_draining(self) -> None:
        """No more keep-alive: idle connections close now, busy ones after their answer."""
        self.lifecycle.start_draining()
        for conn in list(self.connections):
            if not conn.busy():
                conn.close()
        self.upgrade_server.start_draining()

    def on_parser_error(self, protocol: HttpProtocol, status: int) -> None:
        self._on_parser_error(protocol, status)

    # ------------------------------------------------------------------ answers

    def internal_error(self, req: Request) -> Response:
        rid = req.rid or secrets.token_hex(16)
        req.rid = rid
        if req.response_headers is None and self._response_headers is not None:
            req.response_headers = self._response_headers()
        resp = Response(
            500,
            None,
            [("Content-Type", CONTENT_TYPE)],
            problem_body(500, "internal error", request_id=rid),
        )
        resp.force_close()
        return resp

    def render_head(self, req: Request, resp: Response, body_len: int | None) -> bytes:
        """The status line and header block of ``resp`` with the gateway's headers."""
        rh = req.response_headers
        # (through the AnswerHeaders protocol: the server knows no pipeline class; the
        # pipeline's ResponseHeaders names the protocol as its base, so that the compiled
        # build calls it directly)
        if rh is not None:
            block, has_date = rh.render(
                resp.headers, req.rid, secure=req.https, extra=req.extra_headers, skip=resp.skip
            )
        else:
            headers = resp.headers
            if resp.skip is not None:
                headers = [h for h in headers if h[0].lower() not in resp.skip]
            if req.extra_headers:
                headers = [*headers, *req.extra_headers]
            block = "".join([f"{name}: {value}\r\n" for name, value in headers])
            low = block.lower()
            has_date = low.startswith("date:") or "\ndate:" in low
        parts = [status_line(resp.status, resp.reason), block.encode("latin-1", "replace")]
        if not has_date:
            parts.append(self.date)
        if body_len is not None:
            parts.append(b"Content-Length: %d\r\n" % body_len)
        if resp.close or self.lifecycle.draining:
            req.keep_alive = False
        if not req.keep_alive:
            parts.append(b"Connection: close\r\n\r\n")
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def write_response(
        self,
        req: Request,
        resp: AnyResponse,
        transport: asyncio.Transport,
        *,
        at_once: bool = False,
    ) -> bool:
        """Write a whole answer; True when the connection stays open.  ``at_once``: sent
        now rather than at the end of the loop's round (a probe answered from the parser:
        queued, it would wait for the whole round's work, every request parsed in it)."""
        # the exact type first: isinstance() on aiohttp's class (an ABC) is slow, and
        # most answers are this module's own
        if type(resp) is not Response and isinstance(resp, web.Response):
            resp = from_web(resp)
        body = resp.body or b""
        status = resp.status
        no_body = status in NO_BODY_STATUS or status < 200
        head = self.render_head(req, resp, None if no_body else len(body))
        req.head_sent = True
        batcher = self.batcher
        if at_once:
            batcher.flush()  # what is queued goes first (this transport's earlier answers)
            if no_body or req.method == "HEAD" or not body:
                transport.write(head)
            else:
                transport.write(head + body)
        elif no_body or req.method == "HEAD" or not body:
            batcher.write(transport, head)
        elif len(body) <= _ONE_WRITE:
            batcher.write(transport, head + body)
        else:
            batcher.write(transport, head)
            batcher.write(transport, body)
        return req.keep_alive
