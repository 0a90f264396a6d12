"""The proxy port's HTTP/1.1 protocol: llhttp (through ``httptools``), one connection each.

A general-purpose server stack costs more CPU per request than the gateway's pipeline;
this one does what a sidecar's proxy port needs and no more:

* requests are parsed by llhttp; a request head that arrives in one packet costs no
  timer, a slower one gets ``client_timeout_s`` to complete, then a 408;
* the head (request line and header fields) is bounded by ``max_header_bytes`` and 256
  fields (431 beyond), and every parse error is a problem+json 400 that closes the
  connection;
* the framing rules llhttp leaves to its user (:mod:`gateway.core.framing`: one valid
  Host, ``chunked`` as the only transfer coding) are checked once the head is in, for
  upgrade requests too: a breach is a problem+json 400 or 501 that closes the connection;
* one request is handled at a time per connection; pipelined requests wait their turn
  (reading pauses meanwhile), and a request body is read with back-pressure;
* an upgrade request (WebSocket) or a CONNECT is handed, with its bytes, to the
  :mod:`gateway.downstream.upgrade` (aiohttp) protocol on the same connection: those are rare and
  keep aiohttp's WebSocket implementation;
* a draining server closes the connection after the answer it is writing.

How answers are written is :mod:`.server`'s, reading holds are :mod:`.flow`'s, the
head's bounds :mod:`.head`'s, and how the connection ends :mod:`.state`'s.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import httptools
from multidict import CIMultiDict, istr

from gateway.batchwrite import SERVING
from gateway.core.client_ip import IPAddress, peer_of
from gateway.core.framing import FramingError, check_transfer_coding
from gateway.downstream.flow import FlowControl
from gateway.downstream.head import HeadReader, HeadTooLarge
from gateway.downstream.messages import AnyResponse, BodyError, Request, ServerSide
from gateway.downstream.state import Conn, Event, move
from gateway.problem import raw_problem

__all__ = ["HttpProtocol"]

_log: Final = logging.getLogger("gateway.downstream.protocol")

_LINGER_S: Final = 5.0  # how long an unread request body is drained after the answer
_SLICE: Final = 2048  # what is parsed at a time of a read that may hold pipelined requests
# Requests queued behind the one being served, at most. A slice holds fewer (the shortest
# request is 18 bytes); only bytes parsed whole with a body in progress can reach it:
# then the last one queued is answered with Connection: close, the connection is
# half-closed, and what the client still sends is dropped unread.
_MAX_QUEUED: Final = _SLICE // 16

# the states by plain names: the hot path compares them on every read and request, and
# an enum's class attribute is looked up slowly
_OPEN: Final = Conn.OPEN
_UPGRADING: Final = Conn.UPGRADING
_ERROR_PENDING: Final = Conn.ERROR_PENDING
_CUT: Final = Conn.CUT
_LINGERING: Final = Conn.LINGERING
# field names looked up as istr: a plain str is case-folded anew on every lookup
_TRANSFER_ENCODING: Final = istr("Transfer-Encoding")
_CONNECTION: Final = istr("Connection")
_PROXY_CONNECTION: Final = istr("Proxy-Connection")
# the class, held as a constant: a Final name is read directly in the compiled build, an
# imported one through the module's namespace on every use
_CIMULTIDICT: Final = CIMultiDict


class HttpProtocol(HeadReader):
    """One client connection on the proxy port (an :class:`asyncio.Protocol` by its
    methods: the event loop calls them by name, and a compiled class cannot also derive
    from an interpreted one)."""

    __slots__ = (
        "_backlog",
        "_backlog_at",
        "_current",
        "_handoff",
        "_head_timer",
        "_keep_waiting",
        "_linger",
        "_pending",
        "_pending_error",
        "_quick_ok",
        "_state",
        "_task",
        "_waiter",
        "flow",
        "idle_since",
        "loop",
        "peer",
        "server",
        "transport",
    )

    def __init__(self, server: ServerSide[HttpProtocol]) -> None:
        super().__init__(server.max_header_bytes)
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[IPAddress | None, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._current: Request | None = None
        # a list, not a deque: an empty deque holds a 64-slot block (~700 bytes) on every
        # connection; this one holds at most _MAX_QUEUED, popped from the front rarely
        self._pending: list[Request] = []
        self._pending_error: tuple[int, str] | None = None
        self._backlog = b""  # bytes read behind a queued request, not parsed yet ...
        self._backlog_at = 0  # ... from this offset on
        self._state = _OPEN
        self._quick_ok = True  # an answer from the parser may be given in this read
        self._handoff: bytes | None = None  # UPGRADING: the bytes for the other protocol
        self._linger: asyncio.TimerHandle | None = None
        self.flow = FlowControl(self.loop, server.body_idle_s)
        self._waiter: asyncio.Future[Request | None] | None = None  # the task waits for a request
        self._keep_waiting = False
        self._task: asyncio.Task[None] | None = None
        self.idle_since = self.loop.time()

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.flow.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:  # noqa: ARG002
        self.transport = None
        self.server.connections.discard(self)
        self._cancel_head_timer()
        self._shed()  # (the parser's callbacks are bound to this object: a cycle)
        self.flow.connection_lost()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        gone = BodyError("the client closed the connection")
        for req in (self._current, *self._pending):
            if req is not None:
                req.content.feed_error(gone)
        self._pending.clear()
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def eof_received(self) -> bool | None:
        """The client half-closed: the transport closes (asyncio.Protocol's default; an
        answer still being written is written first)."""
        return None

    def peer_address(self) -> tuple[IPAddress | None, str]:
        peer = self.peer
        if peer is None:
            peer = self.peer = peer_of(self.transport)
        return peer

    def busy(self) -> bool:
        return self._current is not None or bool(self._pending)

    def shed_idle(self) -> None:
        """Drop what an idle connection does not need until its next request (the
        parser, the last head): called by the server's housekeeping, not per request."""
        if (
            self._parser is not None
            and self._state is _OPEN
            and not self._in_head
            and not self.busy()
            and not self._backlog
        ):
            self._shed()

    def close(self) -> None:
        self._cancel_head_timer()
        if self.transport is not None:
            self.server.batcher.flush()  # what is queued for it goes first
            self.transport.close()

    # ------------------------------------------------------------------ state

    def _to(self, event: Event) -> None:
        state = self._state = move(self._state, event)
        if state.discarding:
            self.flow.released = True  # what arrives is dropped: reading no longer held

    # ------------------------------------------------------------------ flow control

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def pause_body(self) -> None:
        self.flow.pause_body()

    def resume_body(self) -> None:
        self.flow.resume_body()

    async def drain(self) -> None:
        await self.flow.drain()

    # ------------------------------------------------------------------ parsing

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is not _OPEN and state is not _ERROR_PENDING:
            if state is _LINGERING:
                # parse only to find the body's end (past the bound, drop unparsed)
                if not (self._chunked and self._framing_over(data)):
                    try:
                        self._parser_now().feed_data(data)
                    except Exception:
                        self.close()
            elif state is _UPGRADING and self._handoff is not None:
                self._handoff += data  # the parser stopped at the upgrade: bytes go along
            return  # (CUT, CLOSING: dropped unread)
        if self._pending:
            # a request waits already: parsed once it is served
            self._backlog = self._backlog[self._backlog_at :] + data
            self._backlog_at = 0
            return
        self._quick_ok = True  # one answer from the parser a read (they are not queued)
        if len(data) <= _SLICE:
            self._feed(data, data, len(data))
        else:
            self._take(data, 0)

    def _take(self, data: bytes, start: int) -> None:
        """Parse ``data`` from ``start`` a slice at a time, and keep what follows unparsed
        once a request waits behind the one being served: a client that pipelines
        thousands of tiny requests in one read holds one read of bytes, not thousands of
        requests. The body of the request being served is parsed whole."""
        n = len(data)
        while start < n:
            if self._pending:
                self._backlog, self._backlog_at = data, start
                return
            current = self._current
            end = n if current is not None and not current.content.complete else start + _SLICE
            if not self._feed(data[start:end] if start or end < n else data, data, end):
                return
            start = end

    def _feed(self, data: bytes, whole: bytes, end: int) -> bool:
        """Parse ``data``, which ``whole[end:]`` follows; False when no more may be parsed."""
        if self._in_head:
            self._head_bytes += len(data)
        parser = self._parser
        if parser is None:  # the first bytes, or the first since the connection went idle
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] :] + whole[end:])
            return False
        except httptools.HttpParserError:
            cause = self._take_failure()
            if isinstance(cause, FramingError):
                self._parse_error(cause.status, cause.detail)
            elif isinstance(cause, _QueueFull):
                # those queued are served, the last with Connection: close; nothing more
                # is parsed, and what the client still sends is dropped
                self._to(Event.QUEUE_FULL)
                self._backlog = b""
            elif isinstance(cause, HeadTooLarge):
                self._parse_error(431, "request header fields too large")
            else:
                self._parse_error(400, "the request could not be parsed")
            return False
        if self._chunked and self._framing_over(data):
            self._parse_error(431, "request trailer fields too large")
            return False
        if self._in_head:
            if self._head_over():
                self._parse_error(431, "request header fields too large")
                return False
            if self._head_timer is None:  # a head starts: the current config's deadline
                self._head_timer = self.loop.call_later(
                    self.server.live().client_timeout_s, self._head_timeout
                )
        return not self._state.discarding

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:  # (a head in one read has none: no call)
            self._cancel_head_timer()
        parser = self._parser
        if parser is None or self._state.discarding:
            return
        target = self._url.decode("latin-1")
        fields = self._fields
        headers: CIMultiDict[str] = _CIMULTIDICT(fields)
        keep_alive = parser.should_keep_alive()
        # httptools formats the version anew on every call, the dearest thing asked of the
        # parser here. llhttp takes 0.9, 1.0, 1.1 and 2.0, and keeps a connection alive by
        # default for 1.1 alone (its major and minor both above 0); for the others only a
        # Connection or Proxy-Connection field can: kept alive without either, it is 1.1
        # (tests/unit/test_downstream_head.py holds llhttp to it)
        if keep_alive and _CONNECTION not in headers and _PROXY_CONNECTION not in headers:
            version = "1.1"
        else:
            version = parser.get_http_version()
        # a FramingError goes out of the parser (answered in _feed), upgrades included
        try:
            host = self.server.hosts.host_of(version, headers, target)
            if _TRANSFER_ENCODING in headers:
                check_transfer_coding(headers.getall(_TRANSFER_ENCODING))
        except FramingError as exc:
            raise self._failing(exc) from None
        if parser.should_upgrade():
            return  # handed over in data_received, with the bytes that follow the head
        size = len(self._url) + self._head_size  # (bounded inline: once per request)
        if size > self._max_head:
            raise self._failing(HeadTooLarge())
        req = Request(
            self,
            parser.get_method().decode("latin-1"),
            target,
            version,
            headers,
            size,
            keep_alive,
            host,
            fields,
        )
        if self._current is None:
            if not req.body_exists and not self.flow.write_paused and self._quick_ok:
                self._quick_ok = False
                try:
                    quick = self.server.answer_now(req)
                except Exception:  # a bug there is not the client's parse error
                    _log.exception("error answering a request from the parser")
                    quick = None
                if quick is not None:
                    self._answer_now(req, quick)
                    return
            self._start(req)
        else:
            self._pending.append(req)
            self.flow.pause_pipeline()

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        req = self._pending[-1] if self._pending else self._current
        if req is not None:
            req.content.feed(body)

    def on_message_complete(self) -> None:
        self._chunked = False
        if self._state.discarding:
            self.close()  # the unread body is over: the answer was sent, close
            return
        pending = self._pending
        req = pending[-1] if pending else self._current
        if req is not None and req.body_exists:  # (NO_BODY has no end to be told of)
            req.content.feed_eof()
        if len(pending) >= _MAX_QUEUED:  # checked once its body is in, if it has one
            pending[-1].keep_alive = False  # answered last, then the connection closes
            raise self._failing(_QueueFull())

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    # ------------------------------------------------------------------ errors

    def _parse_error(self, status: int, detail: str) -> None:
        req = self._current
        if req is not None and not self._pending and not req.content.complete:
            # the body of the request being handled is malformed: it answers
            req.content.feed_error(BodyError(f"malformed request body: {detail}"))
            req.keep_alive = False
            self.flow.pause_pipeline()
            return
        if self.busy():
            self._pending_error = (status, detail)  # answered after those before it
            self._to(Event.ERROR_WAITS)
            self.flow.pause_pipeline()
            return
        self._write_error(status, detail)

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if not self._in_head or self._state.discarding:
            return  # no head is awaited any more: the connection is ending
        if transport is None or transport.is_closing():
            return  # no head is awaited any more: the connection is ending
        if self.busy():  # a head behind a request being served: its time starts again
            self._head_timer = self.loop.call_later(
                self.server.live().client_timeout_s, self._head_timeout
            )
            return
        self._write_error(408, "the request was not received in time")

    def _write_error(self, status: int, detail: str) -> None:
        transport = self.transport
        if transport is None:
            return
        self._to(Event.CLOSE)  # nothing after this is parsed
        self._cancel_head_timer()
        server = self.server
        server.batcher.flush()
        live = server.live()
        transport.write(
            raw_problem(
                status,
                detail,
                rid_header=live.rid_header,
                static_headers=live.response_headers.static_block(),
            )
        )
        server.on_parser_error(self, status)
        transport.close()

    # ------------------------------------------------------------------ requests

    def _answer_now(self, req: Request, resp: AnyResponse) -> None:
        transport = self.transport
        if transport is None:
            return
        keep = self.server.write_response(req, resp, transport, at_once=True)
        self.idle_since = self.loop.time()
        if not keep:
            self._to(Event.CLOSE)  # whatever follows in this packet is not served
            self.close()

    def _start(self, req: Request) -> None:
        """Serve ``req`` now: wake this connection's task, or start one."""
        self._current = req
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(req)
        else:
            self._task = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        """This connection's task: one request after the other (the first is
        ``_current``), while the connection lives.

        One task a connection (not one a request) and plain awaits: the handler's answer
        is written synchronously as soon as it returns.
        """
        handler = self.server.handler
        finished = self.server.finished
        req = self._current
        while req is not None:
            resp: AnyResponse | None = None
            SERVING.active += 1  # until its answer is written (the batchers read it)
            try:
                try:
                    resp = await handler(req)
                except (ConnectionError, BodyError):
                    req.keep_alive = False
                except asyncio.CancelledError:
                    self._current = None
                    raise
                except Exception:
                    _log.exception("error handling a request")
                    req.keep_alive = False
                    if not req.head_sent:
                        resp = self.server.internal_error(req)
                nxt = self._finish(req, resp)
            finally:
                SERVING.active -= 1
            if finished is not None:
                try:  # (None: no answer, or not all of it, went out)
                    finished(req, resp if req.head_sent else None)
                except Exception:  # the answer is out: a bug here must not end the connection
                    _log.exception("error recording a request")
            if nxt is None:
                if not self._keep_waiting:
                    return
                req = resp = None  # an idle connection holds neither (nor what they hold)
                waiter = self._waiter = self.loop.create_future()
                nxt = await waiter
                if nxt is None:
                    return
            elif self.flow.write_paused:  # the client is not reading: no more answers until it does
                try:
                    await self.drain()
                except ConnectionError:
                    self._current = None
                    return
            req = nxt

    def _finish(self, req: Request, resp: AnyResponse | None) -> Request | None:
        """Write the answer; return the next request to serve (None: wait or stop)."""
        self._current = None
        self._keep_waiting = False
        transport = self.transport
        if transport is None:
            return None
        if not req.content.complete:
            req.keep_alive = False  # the rest of the body is drained, then the connection closes
        if resp is not None and not req.head_sent:
            keep = self.server.write_response(req, resp, transport)
        else:
            keep = req.keep_alive and not self.server.lifecycle.draining
        self.idle_since = self.loop.time()
        if not keep:
            self._close_after(req)
            return None
        return self._next()

    def _next(self) -> Request | None:
        """What follows a kept-alive exchange: a queued request, an error, a handover, a wait."""
        if self._pending:
            nxt = self._current = self._pending.pop(0)
            backlog = self._backlog
            if backlog and not self._pending:
                self._backlog = b""
                self._take(backlog, self._backlog_at)  # may queue the next request again
            if not self._pending and self._state is _OPEN:
                self.flow.resume_pipeline()  # (an upgrade or an error found there: no more reads)
            return nxt
        if self._state is _ERROR_PENDING and self._pending_error is not None:
            status, detail = self._pending_error
            self._write_error(status, detail)
            return None
        if self._state is _UPGRADING and self._handoff is not None:
            self._do_handoff(self._handoff)
            return None
        if self.flow.pipeline_paused:  # (most often not: no call)
            self.flow.resume_pipeline()
        if self.server.lifecycle.draining:
            self.close()
            return None
        self._keep_waiting = True
        return None

    def _close_after(self, req: Request) -> None:
        transport = self.transport
        if transport is None:
            return
        self._pending.clear()
        self._backlog = b""
        cut = self._state is _CUT
        if req.content.complete and not cut:
            self.close()
            return
        if cut:
            # the client may still be sending requests that were not read: closing now
            # would reset the connection and could lose answers not sent yet. The end of
            # the answers is signalled, and what comes is dropped until the client closes.
            self.server.batcher.flush()
            if transport.can_write_eof():
                transport.write_eof()
        # linger: read and drop what the client still sends, so it gets the answer
        self._to(Event.ANSWERED_EARLY)
        self.flow.read_all()  # whatever held reading back (released now: holds no-op)
        self._linger = self.loop.call_later(_LINGER_S, transport.close)

    # ------------------------------------------------------------------ upgrades

    def _upgrade(self, rest: bytes) -> None:
        data = self._raw_head() + rest
        if self.busy():
            self._handoff = data
            self._to(Event.UPGRADE_WAITS)
            self.flow.pause_pipeline()
        else:
            self._do_handoff(data)

    def _do_handoff(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._waiter is not None:  # this connection's task ends: aiohttp serves it now
            self._waiter.set_result(None)
            self._waiter = None
        self._cancel_head_timer()
        self.server.batcher.flush()  # the other protocol writes directly
        self.server.connections.discard(self)
        self.flow.read_all()
        proto = self.server.upgrade_server()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(data)
        self.transport = self.flow.transport = None


class _QueueFull(Exception):  # noqa: N818 - a signal out of a parser callback
    """Too many requests queued behind the one being served: parse no more."""
