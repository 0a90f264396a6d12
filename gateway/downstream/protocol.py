"""The proxy port's HTTP/1.1 server: llhttp (through ``httptools``) under a lean protocol.

A general-purpose server stack costs more CPU per request than the rest of the
gateway's pipeline; this one does what a sidecar's proxy port needs and no more:

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
* a response whose body is all known leaves in one write; a streamed one is sent as it
  comes (``Content-Length`` when known, else chunked; raw then close for HTTP/1.0);
* every response gets the request id, the security headers and a ``Date``; the server
  banner is never sent;
* an upgrade request (WebSocket) or a CONNECT is handed, with its bytes, to the
  :mod:`gateway.downstream.upgrade` (aiohttp) protocol on the same connection: those are rare and
  keep aiohttp's WebSocket implementation;
* idle keep-alive connections close after ``keepalive_s``; draining closes idle ones at
  once and busy ones after their response; a client that takes no byte of its answers
  for ``send_idle_s`` (``request.body_idle_s``) while they wait is disconnected.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import httptools
from aiohttp import web
from multidict import CIMultiDict, MultiDict, MultiDictProxy
from yarl import URL

from gateway.batchwrite import WriteBatcher
from gateway.core.framing import FramingError, check_transfer_coding, request_host
from gateway.pipeline.client_ip import IPAddress, peer_of
from gateway.problem import CONTENT_TYPE, PHRASES, problem_body, raw_problem

if TYPE_CHECKING:
    from gateway.downstream.upgrade import GatewayServer
    from gateway.pipeline.headers import ResponseHeaders

__all__ = ["BodyError", "HttpProtocol", "HttpServer", "Request", "Response"]

_log = logging.getLogger("gateway.downstream.protocol")

MAX_FIELDS = 256
_HOST_CACHE_MAX = 1024  # distinct Host values remembered with their parse (a few in practice)
_BODY_HIGH = 256 * 1024  # pause reading the client above this much unread body
_LINGER_S = 5.0  # how long an unread request body is drained after the answer
_NO_BODY_STATUS = frozenset((204, 304))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ONE_WRITE = 16 * 1024  # bodies up to this size are joined to the head
_READ_MAX = 256 * 1024  # the most one read delivers (uvloop's buffer)
_SLICE = 2048  # what is parsed at a time of a read that may hold pipelined requests
# Requests queued behind the one being served, at most. A slice holds fewer (the shortest
# request is 18 bytes); only bytes parsed whole with a body in progress can reach it:
# then the last one queued is answered with Connection: close, the connection is
# half-closed, and what the client still sends is dropped unread.
_MAX_QUEUED = _SLICE // 16


_STATUS_LINES: dict[int, bytes] = {
    code: f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1") for code, phrase in PHRASES.items()
}


def _phrase(status: int) -> str:
    return PHRASES.get(status, "Unknown")


def status_line(status: int, reason: str | None) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is not None and (not reason or reason == PHRASES[status]):
        return line
    reason = (reason or _phrase(status)).replace("\r", " ").replace("\n", " ")
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace")


class BodyError(Exception):
    """The client's request body could not be read (malformed, or the client left)."""


class Response:
    """An answer whose headers are a plain list; ``body`` None once a stream was sent."""

    __slots__ = ("body", "close", "headers", "reason", "skip", "status")

    def __init__(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        body: bytes | None,
        skip: frozenset[str] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.close = False
        # None, or UPSTREAM_SKIP: ``headers`` are an upstream's as they came
        self.skip = skip

    def force_close(self) -> None:
        self.close = True


AnyResponse = Response | web.Response


class Body:
    """A request body as it arrives, read with :meth:`readany` (b"" at its end)."""

    __slots__ = ("_chunks", "_eof", "_exc", "_proto", "_size", "_waiter")

    def __init__(self, proto: HttpProtocol) -> None:
        self._proto = proto
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _BODY_HIGH:
            self._proto.pause_body()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def feed_error(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._wake()

    @property
    def complete(self) -> bool:
        return self._eof

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take_whole(self) -> bytes | None:
        """All of the body when it is here already (a small one usually is), else None:
        no wait, and no copy of a body that came in one piece."""
        if not self._eof or self._exc is not None:
            return None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._proto.resume_body()
        return data

    def take_into(self, out: list[bytes]) -> int:
        """Move what has arrived to ``out`` as it came (no join); return its size."""
        n = self._size
        if n:
            out.extend(self._chunks)
            self._chunks.clear()
            self._size = 0
            self._proto.resume_body()
        return n

    async def wait(self) -> None:
        """Until more of the body is here, or its end (raises when it cannot come)."""
        while not self._chunks and not self._eof:
            if self._exc is not None:
                raise self._exc
            self._waiter = self._proto.loop.create_future()
            await self._waiter

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = self._proto.loop.create_future()
            await self._waiter
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._proto.resume_body()
        return data


class _NoBody:
    """The body of a request that announced none (most of them): nothing to read or hold."""

    __slots__ = ()
    complete = True

    def feed(self, data: bytes) -> None:
        pass  # the parser gives no body to a request without a length or chunking

    def feed_eof(self) -> None:
        pass

    def feed_error(self, exc: BaseException) -> None:
        pass

    async def readany(self) -> bytes:
        return b""


NO_BODY = _NoBody()


class Request:
    """One request on the proxy port, with the gateway's per-request state."""

    __slots__ = (
        "_query",
        "_rel_url",
        "_stream_mode",
        "body_exists",
        "content",
        "content_length",
        "extra_headers",
        "head_sent",
        "header_bytes",
        "headers",
        "host",
        "https",
        "keep_alive",
        "method",
        "path",
        "protocol",
        "raw_path",
        "response_headers",
        "rid",
        "version",
    )

    def __init__(  # noqa: PLR0917 - built in one place, by the protocol
        self,
        protocol: HttpProtocol,
        method: str,
        target: str,
        version: str,
        headers: CIMultiDict[str],
        header_bytes: int,
        keep_alive: bool,
        host: str | None = None,
    ) -> None:
        self.protocol = protocol
        # the host it is for (lower-case, no port or trailing dot, IPv6 unbracketed)
        self.host = host
        self.method = method
        self.raw_path = target
        self.version = version
        self.headers = headers
        self.header_bytes = header_bytes
        self.keep_alive = keep_alive
        if target[:1] == "/":
            path = target.partition("?")[0]
            if "%" in path:
                path = URL.build(path=path, encoded=True).path
            self.path = path
            self._rel_url: URL | None = None
        else:
            self._rel_url = URL(target, encoded=True).relative()
            self.path = self._rel_url.path
        self._query: MultiDictProxy[str] | None = None
        cl = headers.get("Content-Length")
        self.content_length = int(cl) if cl is not None else None
        te = headers.get("Transfer-Encoding")
        self.body_exists = bool(self.content_length) or te is not None
        if te is not None and version == "1.0":
            self.keep_alive = False  # its framing is faulty: close after it (RFC 9112 6.1)
        self.content: Body | _NoBody = Body(protocol) if self.body_exists else NO_BODY
        self.rid: str | None = None
        self.response_headers: ResponseHeaders | None = None
        self.https = False
        self.extra_headers: list[tuple[str, str]] | None = None
        self.head_sent = False
        self._stream_mode = 0  # 0 raw, 1 chunked, 2 no body (HEAD, 204, 304)

    # what the pipeline reads of a request (gateway.pipeline.request.PipelineRequest)
    fields_decoded = False  # field values are kept as sent (latin-1)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    def peer_address(self) -> tuple[IPAddress | None, str]:
        return self.protocol.peer_address()

    def target_host(self) -> str | None:
        return self.host

    def lean_body(self) -> Body | None:
        content = self.content
        return content if isinstance(content, Body) else None

    def websocket_request(self) -> None:
        return None  # upgrades are handed to the upgrade protocol before the pipeline

    @property
    def rel_url(self) -> URL:
        if self._rel_url is None:
            self._rel_url = URL(self.raw_path, encoded=True)
        return self._rel_url

    @property
    def query(self) -> MultiDictProxy[str]:
        if self._query is None:
            self._query = (
                self.rel_url.query if "?" in self.raw_path else MultiDictProxy(MultiDict())
            )
        return self._query

    # ------------------------------------------------------------------ answering

    async def send_continue(self) -> None:
        transport = self.protocol.transport
        if transport is not None and not self.head_sent:
            self.protocol.server.batcher.flush()
            transport.write(_CONTINUE)

    async def start_stream(
        self, status: int, reason: str | None, headers: list[tuple[str, str]]
    ) -> Response:
        """Send the head of a streamed answer; the body follows with :meth:`write`."""
        proto = self.protocol
        resp = Response(status, reason, headers, None)
        if status in _NO_BODY_STATUS or self.method == "HEAD" or status < 200:
            mode = 2
        elif any(n.lower() == "content-length" for n, _ in headers):
            mode = 0
        elif self.version == "1.1":
            headers.append(("Transfer-Encoding", "chunked"))
            mode = 1
        else:
            mode = 0
            self.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        self._stream_mode = mode
        head = proto.server.render_head(self, resp, None)
        self.head_sent = True
        transport = proto.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        proto.server.batcher.flush()
        transport.write(head)
        await proto.drain()
        return resp

    async def write(self, data: bytes) -> None:
        mode = self._stream_mode
        if not data or mode == 2:
            return
        transport = self.protocol.transport
        if transport is None:
            raise ConnectionResetError("the client closed the connection")
        if mode == 1:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)
        await self.protocol.drain()

    async def write_eof(self) -> None:
        if self._stream_mode == 1:
            self._stream_mode = 2
            transport = self.protocol.transport
            if transport is None:
                raise ConnectionResetError("the client closed the connection")
            transport.write(b"0\r\n\r\n")


Handler = Callable[[Request], Coroutine[Any, Any, AnyResponse]]


class HttpProtocol(asyncio.Protocol):
    """One client connection on the proxy port."""

    __slots__ = (
        "_backlog",
        "_backlog_at",
        "_body_paused",
        "_chunked",
        "_chunks",
        "_current",
        "_cut",
        "_discarding",
        "_drain_waiter",
        "_fields",
        "_framing",
        "_handoff",
        "_head_bytes",
        "_head_size",
        "_head_timer",
        "_in_head",
        "_keep_waiting",
        "_linger",
        "_parser",
        "_pending",
        "_pending_error",
        "_pipeline_paused",
        "_quick_ok",
        "_stall_size",
        "_stall_timer",
        "_task",
        "_url",
        "_waiter",
        "_write_paused",
        "idle_since",
        "loop",
        "peer",
        "server",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[IPAddress | None, str] | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_size = 0
        self._in_head = False
        # a chunked body: bytes read that were not body (chunk lines, trailer fields)
        self._chunked = False
        self._chunks = 0
        self._framing = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._current: Request | None = None
        self._pending: collections.deque[Request] = collections.deque()
        self._pending_error: tuple[int, str] | None = None
        self._backlog = b""  # bytes read behind a queued request, not parsed yet ...
        self._backlog_at = 0  # ... from this offset on
        self._cut = False  # the queue bound was reached: nothing more is read
        self._quick_ok = True  # an answer from the parser may be given in this read
        self._handoff: bytes | None = None
        self._discarding = False
        self._linger: asyncio.TimerHandle | None = None
        self._body_paused = False
        self._pipeline_paused = False
        self._write_paused = False
        self._stall_timer: asyncio.TimerHandle | None = None  # armed while writing is paused
        self._stall_size = 0
        self._drain_waiter: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[Request | None] | None = None  # the task waits for a request
        self._keep_waiting = False
        self._task: asyncio.Task[None] | None = None
        self.idle_since = self.loop.time()

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:  # noqa: ARG002
        self.transport = None
        self.server.connections.discard(self)
        self._cancel_head_timer()
        self._cancel_stall_timer()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        gone = BodyError("the client closed the connection")
        for req in (self._current, *self._pending):
            if req is not None:
                req.content.feed_error(gone)
        self._pending.clear()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))
        self._drain_waiter = None
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def peer_address(self) -> tuple[IPAddress | None, str]:
        peer = self.peer
        if peer is None:
            peer = self.peer = peer_of(self.transport)
        return peer

    def busy(self) -> bool:
        return self._current is not None or bool(self._pending)

    def close(self) -> None:
        self._cancel_head_timer()
        if self.transport is not None:
            self.server.batcher.flush()  # what is queued for it goes first
            self.transport.close()

    # ------------------------------------------------------------------ flow control

    def pause_writing(self) -> None:
        # A client that sends requests but does not read its answers gets no more served
        # until it does: without this, pipelined answers would pile up in memory.
        self._write_paused = True
        self._set_reading()
        # ... and one that takes nothing of them for body_idle_s is cut off: an answer it
        # does not read must not hold memory, a connection and an upstream for ever
        transport = self.transport
        if self._stall_timer is None and transport is not None:
            self._stall_size = transport.get_write_buffer_size()
            self._stall_timer = self.loop.call_later(self.server.send_idle_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._write_paused = False
        self._cancel_stall_timer()
        self._set_reading()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        transport = self.transport
        if transport is None or not self._write_paused:
            return
        size = transport.get_write_buffer_size()
        if size < self._stall_size:  # it reads, slowly: progress restarts the time
            self._stall_size = size
            self._stall_timer = self.loop.call_later(self.server.send_idle_s, self._write_stalled)
            return
        transport.abort()  # close() would wait for the unread bytes to be taken

    async def drain(self) -> None:
        if self._write_paused:
            if self.transport is None:
                raise ConnectionResetError("the client closed the connection")
            waiter = self._drain_waiter = self.loop.create_future()
            await waiter

    def pause_body(self) -> None:
        if not self._body_paused:
            self._body_paused = True
            self._set_reading()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            self._set_reading()

    def _set_reading(self) -> None:
        """Read while nothing holds reading back: an unread request body over its high
        mark, requests queued behind the one being served, answers the client does not
        read. (Lingering reads on, to drop what the client still sends.)"""
        transport = self.transport
        if transport is None or self._discarding:
            return
        if self._body_paused or self._pipeline_paused or self._write_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # ------------------------------------------------------------------ parsing

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            # lingering: parse only to find the body's end (past the bound, or after the
            # queue was cut, drop unparsed)
            if (
                self._linger is not None
                and not self._cut
                and not (self._chunked and self._framing_over(data))
            ):
                try:
                    self._parser.feed_data(data)
                except Exception:
                    self.close()
            return
        if self._handoff is not None:
            self._handoff += data  # the parser stopped at the upgrade: bytes go along
            return
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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade(data[exc.args[0] :] + whole[end:])
            return False
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, FramingError):
                self._parse_error(exc.__context__.status, exc.__context__.detail)
            elif isinstance(exc.__context__, _QueueFull):
                # those queued are served, the last with Connection: close; nothing more
                # is parsed, and what the client still sends is dropped
                self._discarding = self._cut = True
                self._backlog = b""
            elif isinstance(exc.__context__, _HeadTooLarge):
                self._parse_error(431, "request header fields too large")
            else:
                self._parse_error(400, "the request could not be parsed")
            return False
        if self._chunked and self._framing_over(data):
            self._parse_error(431, "request trailer fields too large")
            return False
        if self._in_head:
            if self._head_bytes > 2 * self.server.max_header_bytes + 8192:
                self._parse_error(431, "request header fields too large")
                return False
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.server.client_timeout_s, self._head_timeout
                )
        return not self._discarding

    def _framing_over(self, data: bytes) -> bool:
        """Whether a chunked body carries too much besides its data. Trailer fields are
        gathered by the parser before any callback, so they are bounded here: the head,
        chunk lines and one read's worth of slack. Called while ``_chunked``."""
        self._framing += len(data)
        return self._framing > 2 * self.server.max_header_bytes + 64 * self._chunks + _READ_MAX

    def on_message_begin(self) -> None:
        self._chunked = False
        self._chunks = 0
        self._framing = 0
        self._in_head = True
        self._url = b""
        self._fields = []
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.max_header_bytes:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
        self._head_size += len(name) + len(value) + 4
        if len(fields) > MAX_FIELDS:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        parser = self._parser
        if self._discarding:
            return
        version = parser.get_http_version()
        target = self._url.decode("latin-1")
        headers = CIMultiDict(self._fields)
        # raises FramingError (out of the parser: answered in _feed), upgrades included
        hosts = headers.getall("Host", ())
        host: str | None
        if len(hosts) == 1 and target[:1] == "/":  # the usual request
            # (a request with a Host field has a host: "" is never one)
            host = self.server.host_cache.get(hosts[0]) or self.server.request_host(
                version, hosts, target
            )
        else:
            host = request_host(version, hosts, target)
        if "Transfer-Encoding" in headers:
            check_transfer_coding(headers.getall("Transfer-Encoding"))
        if parser.should_upgrade():
            return  # handed over in data_received, with the bytes that follow the head
        size = len(self._url) + self._head_size
        if size > self.server.max_header_bytes:
            raise _HeadTooLarge
        req = Request(
            self,
            parser.get_method().decode("latin-1"),
            target,
            version,
            headers,
            size,
            parser.should_keep_alive(),
            host,
        )
        if self._current is None:
            if not req.body_exists and not self._write_paused and self._quick_ok:
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
            self._pause_pipeline()

    def on_chunk_header(self) -> None:
        self._chunked = True
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        req = self._pending[-1] if self._pending else self._current
        if req is not None:
            req.content.feed(body)

    def on_message_complete(self) -> None:
        self._chunked = False
        if self._discarding:
            self.close()  # the unread body is over: the answer was sent, close
            return
        pending = self._pending
        req = pending[-1] if pending else self._current
        if req is not None:
            req.content.feed_eof()
        if len(pending) >= _MAX_QUEUED:  # checked once its body is in, if it has one
            pending[-1].keep_alive = False  # answered last, then the connection closes
            raise _QueueFull

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _pause_pipeline(self) -> None:
        if not self._pipeline_paused:
            self._pipeline_paused = True
            self._set_reading()

    def _resume_pipeline(self) -> None:
        if self._pipeline_paused:
            self._pipeline_paused = False
            self._set_reading()

    # ------------------------------------------------------------------ errors

    def _parse_error(self, status: int, detail: str) -> None:
        req = self._current
        if req is not None and not self._pending and not req.content.complete:
            # the body of the request being handled is malformed: it answers
            req.content.feed_error(BodyError(f"malformed request body: {detail}"))
            req.keep_alive = False
            self._pause_pipeline()
            return
        if self.busy():
            self._pending_error = (status, detail)  # answered after those before it
            self._pause_pipeline()
            return
        self._write_error(status, detail)

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self.transport
        if not self._in_head or self._discarding or transport is None or transport.is_closing():
            return  # no head is awaited any more: the connection is ending
        if self.busy():  # a head behind a request being served: its time starts again
            self._head_timer = self.loop.call_later(
                self.server.client_timeout_s, self._head_timeout
            )
            return
        self._write_error(408, "the request was not received in time")

    def _write_error(self, status: int, detail: str) -> None:
        transport = self.transport
        if transport is None:
            return
        self._discarding = True  # nothing after this is parsed
        self._cancel_head_timer()
        server = self.server
        server.batcher.flush()
        transport.write(
            raw_problem(
                status, detail, rid_header=server.rid_header, static_headers=server.static_headers
            )
        )
        server.on_parser_error(self, status)
        transport.close()

    # ------------------------------------------------------------------ requests

    def _answer_now(self, req: Request, resp: AnyResponse) -> None:
        transport = self.transport
        if transport is None:
            return
        keep = self.server.write_response(req, resp, transport)
        self.idle_since = self.loop.time()
        if not keep:
            self._discarding = True  # whatever follows in this packet is not served
            self.close()

    def _start(self, req: Request) -> None:
        """Serve ``req`` now: wake this connection's task, or start one."""
        self._current = req
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(req)
        else:
            self._task = self.loop.create_task(self._serve(req))

    async def _serve(self, req: Request) -> None:
        """This connection's task: one request after the other, while the connection lives.

        One task a connection (not one a request) and plain awaits: the handler's answer
        is written synchronously as soon as it returns.
        """
        handler = self.server.handler
        while True:
            resp: AnyResponse | None = None
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
            if nxt is None:
                if not self._keep_waiting:
                    return
                waiter = self._waiter = self.loop.create_future()
                nxt = await waiter
                if nxt is None:
                    return
            elif self._write_paused:  # the client is not reading: no more answers until it does
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
            keep = req.keep_alive and not self.server.draining
        self.idle_since = self.loop.time()
        if not keep:
            self._close_after(req)
            return None
        return self._next()

    def _next(self) -> Request | None:
        """What follows a kept-alive exchange: a queued request, an error, a handover, a wait."""
        if self._pending:
            nxt = self._current = self._pending.popleft()
            backlog = self._backlog
            if backlog and not self._pending:
                self._backlog = b""
                self._take(backlog, self._backlog_at)  # may queue the next request again
            if not self._pending and self._handoff is None and self._pending_error is None:
                self._resume_pipeline()  # (an upgrade or an error found there: no more reads)
            return nxt
        if self._pending_error is not None:
            status, detail = self._pending_error
            self._write_error(status, detail)
            return None
        if self._handoff is not None:
            self._do_handoff(self._handoff)
            return None
        self._resume_pipeline()
        if self.server.draining:
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
        if req.content.complete and not self._cut:
            self.close()
            return
        if self._cut:
            # the client may still be sending requests that were not read: closing now
            # would reset the connection and could lose answers not sent yet. The end of
            # the answers is signalled, and what comes is dropped until the client closes.
            self.server.batcher.flush()
            if transport.can_write_eof():
                transport.write_eof()
        # linger: read and drop what the client still sends, so it gets the answer
        self._discarding = True
        self._body_paused = self._pipeline_paused = False
        transport.resume_reading()  # whatever held reading back (_set_reading now no-ops)
        self._linger = self.loop.call_later(_LINGER_S, transport.close)

    # ------------------------------------------------------------------ upgrades

    def _upgrade(self, rest: bytes) -> None:
        parser = self._parser
        lines = [
            parser.get_method() + b" " + self._url + b" HTTP/" + parser.get_http_version().encode()
        ]
        # the head again for the other protocol (latin-1 gives back the very bytes)
        lines.extend(f"{n}: {v}".encode("latin-1") for n, v in self._fields)
        data = b"\r\n".join(lines) + b"\r\n\r\n" + rest
        if self.busy():
            self._handoff = data
            self._pause_pipeline()
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
        self._pipeline_paused = self._body_paused = False
        transport.resume_reading()
        proto = self.server.upgrade_server()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(data)
        self.transport = None


class _QueueFull(Exception):  # noqa: N818 - a signal out of a parser callback
    """Too many requests queued behind the one being served: parse no more."""


class _HeadTooLarge(Exception):  # noqa: N818 - a signal out of a parser callback
    pass


class HttpServer:
    """Makes :class:`HttpProtocol` for each connection; tracks them for draining."""

    def __init__(
        self,
        handler: Handler,
        *,
        upgrade_server: GatewayServer,
        answer_now: Callable[[Request], AnyResponse | None] | None = None,
        client_timeout_s: float,
        max_header_bytes: int,
        static_headers: str = "",
        rid_header: str = "X-Request-ID",
        on_parser_error: Callable[[Any, int], None] | None = None,
        response_headers: Callable[[], ResponseHeaders] | None = None,
        keepalive_s: float = 75.0,
        send_idle_s: float = 10.0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.answer_now = answer_now or (lambda _r: None)
        self.upgrade_server = upgrade_server
        self.client_timeout_s = client_timeout_s
        self.max_header_bytes = max_header_bytes
        self.static_headers = static_headers
        self.rid_header = rid_header
        self._on_parser_error = on_parser_error or (lambda _p, _s: None)
        self._response_headers = response_headers
        self.keepalive_s = keepalive_s
        self.send_idle_s = send_idle_s  # a client that takes no bytes that long is cut off
        self.connections: set[HttpProtocol] = set()
        # the Host value of an origin-form request -> its host
        self.host_cache: dict[str, str] = {}
        self.batcher = WriteBatcher(self.loop)  # whole answers, sent at the end of a round
        self.draining = False
        self.date = b""
        self._tick: asyncio.TimerHandle | None = None
        self._tick_date()

    def __call__(self) -> HttpProtocol:
        return HttpProtocol(self)

    # ------------------------------------------------------------------ housekeeping

    def _tick_date(self) -> None:
        """Refresh the Date header and close idle keep-alive connections (once a second)."""
        self.date = b"Date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"
        now = self.loop.time()
        for conn in list(self.connections):
            if not conn.busy() and now - conn.idle_since > self.keepalive_s:
                conn.close()
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
        self.draining = True
        for conn in list(self.connections):
            if not conn.busy():
                conn.close()
        self.upgrade_server.start_draining()

    def on_parser_error(self, protocol: HttpProtocol, status: int) -> None:
        self._on_parser_error(protocol, status)

    def request_host(self, version: str, hosts: Sequence[str], target: str) -> str:
        """:func:`gateway.core.framing.request_host` of a request with one Host field and
        an origin-form target, remembered in :attr:`host_cache` (a client sends the same
        few values; a value that is refused is not remembered)."""
        host = request_host(version, hosts, target) or ""  # (one Host: never None)
        cache = self.host_cache
        if len(cache) >= _HOST_CACHE_MAX:
            cache.clear()
        cache[hosts[0]] = host
        return host

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
        if resp.close or self.draining:
            req.keep_alive = False
        if not req.keep_alive:
            parts.append(b"Connection: close\r\n\r\n")
        elif req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    def write_response(self, req: Request, resp: AnyResponse, transport: asyncio.Transport) -> bool:
        """Write a whole answer; True when the connection stays open."""
        # the exact type first: isinstance() on aiohttp's class (an ABC) costs ~0.5 µs
        if type(resp) is not Response and isinstance(resp, web.Response):
            resp = from_web(resp)
        body = resp.body or b""
        status = resp.status
        no_body = status in _NO_BODY_STATUS or status < 200
        head = self.render_head(req, resp, None if no_body else len(body))
        req.head_sent = True
        batcher = self.batcher
        if no_body or req.method == "HEAD" or not body:
            batcher.write(transport, head)
        elif len(body) <= _ONE_WRITE:
            batcher.write(transport, head + body)
        else:
            batcher.write(transport, head)
            batcher.write(transport, body)
        return req.keep_alive


def from_web(resp: web.Response) -> Response:
    """An aiohttp response of shared code (probes, problems, metrics) as a :class:`Response`."""
    body = resp.body
    headers = [(n, v) for n, v in resp.headers.items() if n.lower() != "content-length"]
    out = Response(
        resp.status,
        resp.reason,
        headers,
        bytes(body) if isinstance(body, bytes | bytearray) else b"",
    )
    if resp.keep_alive is False:
        out.force_close()
    return out


def to_web(resp: AnyResponse | web.StreamResponse) -> web.StreamResponse:
    """A :class:`Response` as aiohttp's, for requests served by the upgrade protocol."""
    if isinstance(resp, web.StreamResponse):
        return resp
    out = web.Response(status=resp.status, reason=resp.reason, body=resp.body)
    skip = resp.skip or frozenset(("content-length",))
    for name, value in resp.headers:
        if name.lower() not in skip:
            out.headers.add(name, value)
    if resp.close:
        out.force_close()
    return out
