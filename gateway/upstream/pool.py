"""A lean HTTP/1.1 client for the upstream leg: a keep-alive pool and streamed answers.

A full client stack (aiohttp's ClientSession) costs more CPU per request than the whole
rest of the pipeline. The upstream of a sidecar is one fixed origin on loopback, so this
client does only what that needs: one request at a time per connection
(:mod:`gateway.upstream.connection`), a pool of idle connections, a body streamed as it
arrives with back-pressure both ways, and deadlines checked by one sweep per pool rather
than a timer or a timeout context per request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Final

from gateway.batchwrite import SERVING, WriteBatcher
from gateway.upstream.body_chunks import body_chunks
from gateway.upstream.connection import (
    DEFAULT_MAX_HEAD_BYTES,
    HEAD_TOO_LARGE,
    MAX_RESPONSE_FIELDS,
    UpstreamConnection,
    UpstreamError,
)

if TYPE_CHECKING:
    from yarl import URL

_ONE_WRITE: Final = 16 * 1024  # a request body up to this size is joined to its head

__all__ = [
    "DEFAULT_MAX_HEAD_BYTES",
    "HEAD_TOO_LARGE",
    "MAX_RESPONSE_FIELDS",
    "LeanPool",
    "LeanResponse",
    "UpstreamError",
]


class LeanResponse:
    """The upstream's answer: status, headers, and a body read as it arrives."""

    __slots__ = ("_conn", "_in_read", "_pool", "_rest", "header_list", "listed", "reason", "status")

    def __init__(
        self,
        pool: LeanPool,
        conn: UpstreamConnection,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
    ) -> None:
        self._pool = pool
        self._conn: UpstreamConnection | None = conn
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

    def detach(self) -> None:
        """All of the answer is in (at most the read-ahead, 1 MiB): its connection goes
        back to the pool now, the rest is passed on from here, and a client slow to take
        it holds no upstream connection. Not while :meth:`iter_body` waits on the
        connection: it takes what came, then detaches."""
        conn = self._conn
        if conn is None or self._in_read or conn.error is not None:
            return
        self._rest = conn.take_rest()
        self.release()

    def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives (an async generator of :mod:`.body_chunks`, a module
        that stays interpreted: the compiled build has no async generators)."""
        return body_chunks(self)

    def begin_read(self) -> UpstreamConnection | None:
        """The connection the body is read from (None once it went back), told to let go
        of itself when it completes while the consumer is busy."""
        conn = self._conn
        if conn is not None:
            conn.on_complete = self.detach
        return conn

    def read_done(self) -> bool:
        """True once the connection went back to the pool (the rest is in :meth:`rest`)."""
        return self._conn is None

    def set_in_read(self, waiting: bool) -> None:
        self._in_read = waiting

    def rest(self) -> list[bytes] | None:
        return self._rest

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
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._batcher = WriteBatcher(self._loop, SERVING)
        # exchanges in progress, their deadlines checked every _sweep_s while there are any:
        # a deadline fires at most a tenth of the timeout (and at most 0.5 s) late
        self._busy: set[UpstreamConnection] = set()
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

    async def _acquire(self, deadline: float) -> tuple[UpstreamConnection, bool]:
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
                    lambda: UpstreamConnection(self._loop, self._max_head), self._host, self._port
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

    def put_back(self, conn: UpstreamConnection) -> None:
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
        if self._waiters:  # (most often none: no call)
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
        idle = self._idle
        for attempt in (0, 1):
            # an idle kept-alive connection, without waiting (inline: every request)
            conn = None
            while idle:
                conn = idle.pop()
                if conn.transport is not None and not conn.transport.is_closing():
                    break
                conn = None
                self._open -= 1
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

    async def _send_body(
        self, conn: UpstreamConnection, body: AsyncIterator[bytes], *, chunked: bool
    ) -> None:
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
