"""A lean HTTP/1.1 client for the upstream leg: keep-alive pool, C parser, streaming body.

A full client stack (aiohttp's ClientSession) costs more CPU per request than the whole
rest of the pipeline. The upstream of a sidecar is one fixed origin on loopback, so this
client does only what that needs: one request at a time per connection, a pool of idle
connections, llhttp (through ``httptools``) to parse the response, a body streamed as it
arrives with back-pressure both ways, and deadlines checked by one sweep per pool rather
than a timer or a timeout context per request.

A response head is bounded like a request head (as Envoy and NGINX bound theirs): over
``max_head_bytes`` (status line and fields) or :data:`MAX_RESPONSE_FIELDS` fields, the
exchange fails with kind ``response_head_too_large`` before any of it is passed on, and
the connection is closed. A head that arrives slowly is bounded by the bytes received
while it is awaited, so it is refused without waiting for its end. What a chunked body
carries besides its data (chunk lines, trailer fields) is bounded the same way, and
trailer fields are never merged into the head (RFC 9110 6.5.1): they are dropped.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

import httptools

from gateway.batchwrite import WriteBatcher

if TYPE_CHECKING:
    from yarl import URL

_HIGH_WATER = 1 << 20  # pause reading the upstream above this much unread body
MAX_RESPONSE_FIELDS = 100  # as Envoy's default; a response head with more is refused
DEFAULT_MAX_HEAD_BYTES = 65536
HEAD_TOO_LARGE = "response_head_too_large"  # the UpstreamError kind
_ONE_WRITE = 16 * 1024  # a request body up to this size is joined to its head
_PLAIN = frozenset((b"keep-alive", b"close"))  # Connection values that name no other field


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, kind: str, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        # connect | timeout | protocol | response_head_too_large (| closed, internal)
        self.kind = kind
        self.sent = sent  # whether any of the request may have reached the upstream


class _CodedError(Exception):
    """The answer has a transfer coding other than chunked."""


class _OutOfStepError(Exception):
    """The upstream sent a message when no answer was due."""


class _HeadTooLargeError(Exception):
    """The response head is over the bounds (the message says which)."""


class _Conn(asyncio.Protocol):
    """One upstream connection; carries one exchange at a time."""

    __slots__ = (
        "_awaiting_head",
        "_body",
        "_body_waiter",
        "_chunks",
        "_drain_waiter",
        "_framing",
        "_head",
        "_head_bytes",
        "_head_only",
        "_head_size",
        "_headers",
        "_interim",
        "_loop",
        "_max_head",
        "_parser",
        "_paused",
        "_reading_paused",
        "_renew",
        "_status",
        "buffered",
        "complete",
        "deadline",
        "error",
        "freed",
        "got_bytes",
        "keep_alive",
        "listed",
        "on_complete",
        "transport",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_head: int = DEFAULT_MAX_HEAD_BYTES
    ) -> None:
        self._loop = loop
        self._max_head = max_head
        self._awaiting_head = False  # no final response head yet for the exchange
        self._head_bytes = 0  # bytes received while awaiting it (interim heads included)
        self._head_size = 0  # status lines and fields of the exchange's heads, once measured
        self._framing = 0  # bytes after the head that were not body (chunk lines, trailers)
        self._chunks = 0
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._renew = False  # the parser must be replaced before the next exchange
        self._interim = False  # the message being parsed is a 1xx, not the answer
        self._head_only = False  # the answer to HEAD: no body whatever its headers say
        self._head: asyncio.Future[None] | None = None
        self._headers: list[tuple[str, str]] = []
        self._status = b""
        self._body: collections.deque[bytes] = collections.deque()
        self._body_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._reading_paused = False
        self.buffered = 0
        self.complete = False
        self.deadline = 0.0  # loop time by which the exchange in progress must be over
        self.keep_alive = True
        self.got_bytes = False
        self.listed = False
        self.error: BaseException | None = None
        self.freed = False  # timed out: its pool slot was given back already
        self.on_complete: Callable[[], None] | None = None  # the body is all in

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self._awaiting_head:
            self._head_bytes += len(data)
        else:
            self._framing += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("protocol", "unexpected upgrade from upstream", sent=True))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadTooLargeError):
                self._fail(UpstreamError(HEAD_TOO_LARGE, str(cause), sent=True))
                return
            if isinstance(cause, _CodedError):
                detail = "upstream used a transfer coding other than chunked"
            else:
                detail = f"malformed upstream response: {exc}"
            self._fail(UpstreamError("protocol", detail, sent=True))
            return
        if self._awaiting_head and self._head_bytes > self._max_head:
            # all of it is head (it has not ended): a head sent slowly is refused here,
            # with no more of it held than one read
            self._fail(
                UpstreamError(
                    HEAD_TOO_LARGE, f"response head over {self._max_head} bytes", sent=True
                )
            )
        elif self._framing > self._max_head + 64 * self._chunks:
            msg = f"response chunk lines and trailer fields over {self._max_head} bytes"
            self._fail(UpstreamError(HEAD_TOO_LARGE, msg, sent=True))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.keep_alive = False
        if exc is None and not self.complete and self.error is None and self._until_close():
            self.complete = True  # the close ends a body framed by neither length nor chunks
            self._wake_body()
        if not self.complete:
            if self._head is not None and not self._head.done() and not self.got_bytes:
                # closed before any answer: nothing was processed, say so for retries
                self._fail(UpstreamError("closed", "upstream closed the connection", sent=True))
            else:
                self._fail(UpstreamError("protocol", "upstream closed mid-response", sent=True))
        self._wake_drain()

    def _until_close(self) -> bool:
        """Whether the answer whose head is in has a body that ends at the close: no
        Content-Length and no Transfer-Encoding (RFC 9112 section 6.3, rule 8; one here is
        chunked, any other was refused in :meth:`on_header`, and a chunked body ends at
        its last chunk, so a close before it is an error)."""
        head = self._head
        if head is None or not head.done() or head.cancelled() or self._interim:
            return False
        if head.exception() is not None:
            return False
        return not any(
            name.lower() in ("content-length", "transfer-encoding") for name, _ in self._headers
        )

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            # a second answer to one request, or bytes on an idle connection: the upstream
            # is out of step, and whatever it sends next would reach the wrong client
            raise _OutOfStepError
        self._status = b""
        self._headers = []
        self.listed = False

    def on_status(self, status: bytes) -> None:
        self._status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._awaiting_head:
            return  # a trailer field: dropped (its bytes are bounded with the chunk lines)
        headers = self._headers
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
        if len(headers) > MAX_RESPONSE_FIELDS:
            raise _HeadTooLargeError(f"response head with over {MAX_RESPONSE_FIELDS} fields")
        if len(name) == 10 and name.lower() == b"connection" and value.lower() not in _PLAIN:
            self.listed = True  # Connection names other fields: they are hop-by-hop too
        elif (
            len(name) == 17
            and name.lower() == b"transfer-encoding"
            and value.strip(b" \t").lower() != b"chunked"
        ):
            # gzip, compress...: the gateway asks for none (it sends no TE field), and it
            # frames answers anew, so the coding would be lost: the body would reach the
            # client still coded with nothing saying so
            raise _CodedError

    def on_headers_complete(self) -> None:
        interim = self._parser.get_status_code() < 200
        # the head is measured only when the bytes received while it was awaited are over
        # the bound (they hold it whole): most answers never pay for the sum
        if interim or self._head_bytes > self._max_head:
            # status line ("HTTP/1.1 200 " and CRLF) and fields; interim heads add up
            self._head_size += (
                len(self._status) + 15 + sum(len(n) + len(v) + 4 for n, v in self._headers)
            )
            if self._head_size > self._max_head:
                raise _HeadTooLargeError(f"response head over {self._max_head} bytes")
        if interim:
            # 100 Continue, 102 Processing, 103 Early Hints: interim, the answer follows
            self._interim = True
            return
        self._awaiting_head = False
        self.keep_alive = self._parser.should_keep_alive()
        if self._head_only:
            # llhttp cannot be told a HEAD answer has no body: this exchange ends here
            # and the next one gets a new parser
            self.complete = True
            self._renew = True
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        self._body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake_body()
        if self.on_complete is not None:
            self.on_complete()

    # ------------------------------------------------------------------ helpers

    def timed_out(self) -> None:
        # the exchange is over: what of the answer waits for a slow client goes now (the
        # client's answer is cut either way), so memory follows the pool's slots
        self._body.clear()
        self.buffered = 0
        self._fail(UpstreamError("timeout", "upstream did not answer in time", sent=True))

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.keep_alive = False
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
        self._wake_body()
        if self.transport is not None:
            self.transport.close()

    def _wake_body(self) -> None:
        w = self._body_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def reset(self, *, head_only: bool = False) -> None:
        """Prepare for the next exchange on this connection (its parser is reused)."""
        if self._renew:
            self._parser = httptools.HttpResponseParser(self)
            self._renew = False
        self._head_only = head_only
        self._awaiting_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._framing = 0
        self._chunks = 0
        self._head = self._loop.create_future()
        self._interim = False
        self._body.clear()
        self.buffered = 0
        self.complete = False
        self.got_bytes = False
        self.error = None

    async def drain(self) -> None:
        if self._paused and self.transport is not None:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter
            self._drain_waiter = None
        if self.transport is None:
            raise self.error or UpstreamError("protocol", "upstream connection lost", sent=True)

    def head(self) -> asyncio.Future[None]:
        """Done when the response head is in (see :meth:`status`)."""
        assert self._head is not None  # noqa: S101 - reset() made it
        return self._head

    def status(self) -> tuple[int, str, list[tuple[str, str]]]:
        return self._parser.get_status_code(), self._status.decode("latin-1"), self._headers

    def take_all(self) -> bytes | None:
        """The whole body when it has already arrived complete, else None."""
        if not self.complete:
            return None
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._emptied()
        return data

    def take_rest(self) -> list[bytes]:
        """What is left of a complete body, as it came (the connection is free after)."""
        rest = list(self._body)
        self._body.clear()
        self._emptied()
        return rest

    def _emptied(self) -> None:
        self.buffered = 0
        if self._reading_paused:  # the next exchange must be read
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    async def next_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self.buffered -= len(chunk)
                if self._reading_paused and self.buffered < _HIGH_WATER // 2 and self.transport:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None


class LeanResponse:
    """The upstream's answer: status, headers, and a body read as it arrives."""

    __slots__ = ("_conn", "_in_read", "_pool", "_rest", "header_list", "listed", "reason", "status")

    def __init__(
        self, pool: LeanPool, conn: _Conn, status: int, reason: str, headers: list[tuple[str, str]]
    ) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = status
        self.reason = reason
        self.header_list = headers
        # whether Connection names fields to drop beyond the hop-by-hop ones
        self.listed = conn.listed
        self._rest: list[bytes] | None = None  # the end of the body, once the connection went back
        self._in_read = False  # iter_body waits on the connection (not on its consumer)

    def body_if_complete(self) -> bytes | None:
        """The whole body if it is already here (small answers usually are)."""
        conn = self._conn
        return conn.take_all() if conn is not None else b""

    def _detach(self) -> None:
        """All of the answer is in (at most the read-ahead, 1 MiB): its connection goes
        back to the pool now, the rest is passed on from here, and a client slow to take
        it holds no upstream connection. Not while :meth:`iter_body` waits on the
        connection: it takes what came, then detaches."""
        conn = self._conn
        if conn is None or self._in_read or conn.error is not None:
            return
        self._rest = conn.take_rest()
        self.release()

    async def iter_body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        conn.on_complete = self._detach  # when it completes while the consumer is busy
        while self._conn is not None:
            if conn.complete and conn.error is None:
                self._detach()
                break
            self._in_read = True
            try:
                chunk = await conn.next_chunk()
            finally:
                self._in_read = False
            if not chunk:
                return
            yield chunk
        rest = self._rest
        if rest:
            rest.reverse()
            while rest:  # each piece let go of once passed on
                yield rest.pop()

    def release(self) -> None:
        """Give the connection back (kept alive only after a complete exchange)."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.on_complete = None
        self._pool.put_back(conn)

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.keep_alive = False
        self.release()


class LeanPool:
    """Keep-alive connections to one origin, at most ``limit`` open at once."""

    __slots__ = (
        "_batcher",
        "_busy",
        "_closed",
        "_connect_timeout",
        "_host",
        "_idle",
        "_loop",
        "_max_head",
        "_open",
        "_port",
        "_sweep_s",
        "_sweeper",
        "_timeout",
        "_waiters",
        "host_header",
        "limit",
    )

    def __init__(
        self,
        url: URL,
        *,
        limit: int,
        connect_timeout_s: float,
        timeout_s: float,
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_head = max_head_bytes
        self._host = url.host or "127.0.0.1"
        self._port = url.port or 80
        self.host_header = url.host_port_subcomponent or self._host
        self.limit = limit
        self._connect_timeout = connect_timeout_s
        self._timeout = timeout_s
        self._idle: collections.deque[_Conn] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._batcher = WriteBatcher(self._loop)
        # exchanges in progress, their deadlines checked every _sweep_s while there are any:
        # a deadline fires at most a tenth of the timeout (and at most 0.5 s) late
        self._busy: set[_Conn] = set()
        self._sweep_s = min(0.5, timeout_s / 10)
        self._sweeper: asyncio.TimerHandle | None = None

    def _sweep(self) -> None:
        busy = self._busy
        now = self._loop.time()
        for conn in [c for c in busy if c.deadline <= now]:
            busy.discard(conn)
            conn.timed_out()
            # its slot is free now, not when the handler lets go of it: that may wait on a
            # client that takes the answer slowly, and timeout_s bounds the pool's use
            conn.freed = True
            self._release_slot()
        self._sweeper = self._loop.call_later(self._sweep_s, self._sweep) if busy else None

    def _idle_conn(self) -> _Conn | None:
        """An idle kept-alive connection, without waiting (None when there is none)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
            self._open -= 1
        return None

    async def _acquire(self, deadline: float) -> tuple[_Conn, bool]:
        """A connection and whether it was reused; the wait for one ends at ``deadline``
        (the exchange's: waiting for a free connection counts against ``timeout_s``)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn, True
            self._open -= 1
        while self._open >= self.limit:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken but leaving: the turn passes to the next in line
                if isinstance(exc, TimeoutError):
                    raise UpstreamError(
                        "timeout", "no upstream connection was free in time", sent=False
                    ) from None
                raise
            while idle:
                conn = idle.pop()
                if conn.transport is not None and not conn.transport.is_closing():
                    return conn, True
                self._open -= 1
        self._open += 1
        connect_by = self._loop.time() + self._connect_timeout
        try:
            async with asyncio.timeout_at(min(connect_by, deadline)):
                _, conn = await self._loop.create_connection(
                    lambda: _Conn(self._loop, self._max_head), self._host, self._port
                )
        except TimeoutError:
            self._release_slot()
            if deadline < connect_by:
                raise UpstreamError(
                    "timeout", "upstream did not answer in time", sent=False
                ) from None
            raise UpstreamError("connect", "connect timed out", sent=False) from None
        except OSError as exc:
            self._release_slot()
            raise UpstreamError("connect", str(exc) or "connection refused", sent=False) from exc
        return conn, False

    def _release_slot(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    def put_back(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        if conn.freed:
            return  # timed out: closed, and its slot given back by the sweep
        transport = conn.transport
        if (
            self._closed
            or not conn.keep_alive
            or not conn.complete
            or transport is None
            or transport.is_closing()
        ):
            if transport is not None:
                transport.close()
            self._release_slot()
            return
        self._idle.append(conn)
        self._wake_one()

    async def request(
        self,
        method: str,
        target: str,
        headers: str | Sequence[tuple[str, str]],
        body: AsyncIterator[bytes] | list[bytes] | None,
        *,
        chunked: bool,
    ) -> LeanResponse:
        r"""Send one request; raise :class:`UpstreamError` if no response head came back.

        ``headers``: the header fields as ``Name: value\r\n`` lines, or (name, value) pairs.
        ``body``: None, all of it as a list of pieces (sent with the head, no wait), or
        an iterator of pieces as they come.
        """
        fields = (
            headers if isinstance(headers, str) else "".join([f"{k}: {v}\r\n" for k, v in headers])
        )
        te = "Transfer-Encoding: chunked\r\n" if chunked else ""
        head = f"{method} {target} HTTP/1.1\r\n{fields}{te}\r\n".encode("latin-1")
        # the whole exchange, the wait for a free connection included
        deadline = self._loop.time() + self._timeout
        # A reused connection the upstream closed meanwhile fails before any answer: try once
        # more on a fresh one when nothing of a body has been consumed.
        for attempt in (0, 1):
            conn = self._idle_conn()
            reused = conn is not None
            if conn is None:
                conn, reused = await self._acquire(deadline)
            conn.reset(head_only=method == "HEAD")
            conn.deadline = deadline
            self._busy.add(conn)
            if self._sweeper is None:
                self._sweeper = self._loop.call_later(self._sweep_s, self._sweep)
            transport = conn.transport
            assert transport is not None  # noqa: S101 - just connected or checked
            try:
                if body is None:
                    self._batcher.write(transport, head)  # sent at the end of this round
                elif type(body) is list:
                    self._write_whole(transport, head, body, chunked=chunked)
                else:
                    transport.write(head)
                    await self._send_body(conn, body, chunked=chunked)  # type: ignore[arg-type]
                await conn.head()
                status, reason, raw = conn.status()
            except UpstreamError as exc:
                conn.keep_alive = False
                self.put_back(conn)
                if (
                    exc.kind == "closed"
                    and reused
                    and (body is None or type(body) is list)
                    and attempt == 0
                ):
                    continue
                if exc.kind == "closed":
                    exc.kind = "protocol"
                raise
            except BaseException:
                conn.keep_alive = False
                conn.head().cancel()  # no answer is awaited now (its close is no error)
                self.put_back(conn)
                raise
            return LeanResponse(self, conn, status, reason, raw)
        msg = "unreachable"  # pragma: no cover
        raise AssertionError(msg)  # pragma: no cover

    def _write_whole(
        self, transport: asyncio.Transport, head: bytes, body: list[bytes], *, chunked: bool
    ) -> None:
        """A request with all of its body: a small one in one write, queued with the round's
        others; a larger one handed over as its pieces (no joined copy)."""
        size = sum(map(len, body))
        if chunked:  # one chunk of all the pieces
            body = [b"%x\r\n" % size, *body, b"\r\n0\r\n\r\n"] if size else [b"0\r\n\r\n"]
        if size <= _ONE_WRITE:
            self._batcher.write(transport, b"".join([head, *body]))
        else:
            self._batcher.flush()
            transport.writelines([head, *body])

    async def _send_body(self, conn: _Conn, body: AsyncIterator[bytes], *, chunked: bool) -> None:
        async for chunk in body:
            transport = conn.transport
            if transport is None:
                raise conn.error or UpstreamError("protocol", "upstream went away", sent=True)
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            await conn.drain()
        if chunked and conn.transport is not None:
            conn.transport.write(b"0\r\n\r\n")

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
