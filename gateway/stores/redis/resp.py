"""A lean pipelined connection to one standalone Redis, for the rate limiter's hot path.

One :class:`asyncio.Protocol` (so it runs as well on uvloop) per TCP, TLS or Unix
connection; replies are parsed by ``hiredis.Reader``; commands are RESP arrays packed by
the caller (:func:`pack_command`) and written as they come, without waiting for earlier
replies.  Each command written has a :class:`Waiter` queued in order; replies resolve
the waiters first in, first out.

Replies
    Whatever hiredis returns (``bytes``, ``int``, ``list``, ``None``), an error reply as
    a :class:`redis.exceptions.ResponseError` instance (never raised by the connection).
    A connection that fails (refused, closed, reset, a protocol error, a deadline
    passed) resolves every waiter it holds with a fresh
    :class:`redis.exceptions.ConnectionError` or :class:`redis.exceptions.TimeoutError`
    instance, and is dropped; the next command opens a new one.

Deadlines
    Each waiter carries a deadline on the loop clock.  One timer per connection (a
    ``loop.call_at`` handle, re-armed only when it fires or a waiter is due earlier)
    watches them: when a waiter is due and its reply has not come, the connection is
    aborted (a Redis late by that much is stuck or gone; a new connection may reach a
    new primary) and every waiter it held fails with ``TimeoutError``.

Connections
    Opened on the first command (or :meth:`RespClient.connect_soon`), bounded by
    ``connect_timeout_s``; commands sent meanwhile are buffered.  ``AUTH`` (password, or
    user and password) and ``SELECT`` (a database other than 0) come from the URL and
    are pipelined ahead of the buffered commands; an error reply to either fails the
    connection.  TCP keepalive is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "Endpoint",
    "FutureWaiter",
    "RespClient",
    "Waiter",
    "bulk_string",
    "pack_command",
]

Arg = bytes | str | int


def bulk_string(arg: Arg) -> bytes:
    """One RESP bulk string (``$<length>\\r\\n<data>\\r\\n``)."""
    if isinstance(arg, bytes):
        data = arg
    elif isinstance(arg, str):
        data = arg.encode()
    else:
        data = b"%d" % arg
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_command(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings (``str`` as UTF-8, ``int`` in decimal)."""
    return b"*%d\r\n" % len(args) + b"".join([bulk_string(a) for a in args])


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: TCP (optionally TLS) or a Unix socket, AUTH, SELECT."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a Unix socket, instead of host and port
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl: ssl.SSLContext | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"{'rediss' if self.ssl else 'redis'}://{self.host}:{self.port}/{self.db}"

    @classmethod
    def from_url(cls, url: str) -> Endpoint | None:
        """The endpoint of a ``redis://``, ``rediss://`` or ``unix://`` URL.

        The URL is read by redis-py's own parser, so options (``ssl_cert_reqs``,
        ``ssl_ca_certs``, ``db``, ...) mean what they mean to redis-py.
        """
        return cls.from_pool(ConnectionPool.from_url(url))

    @classmethod
    def from_client(cls, client: object) -> Endpoint | None:
        """The endpoint of a ``redis.asyncio.Redis`` client (``None`` for anything else)."""
        if not isinstance(client, Redis):
            return None
        return cls.from_pool(client.connection_pool)

    @classmethod
    def from_pool(cls, pool: ConnectionPool) -> Endpoint | None:
        """``None`` for what this connection does not speak (Sentinel, credential providers)."""
        kind = pool.connection_class
        if kind not in (Connection, SSLConnection, UnixDomainSocketConnection):
            return None
        # An unconnected redis-py connection: its attributes are the URL's settings as
        # redis-py understands them (TLS context included).
        conn: Any = kind(**pool.connection_kwargs)
        if conn.credential_provider is not None:
            return None
        common: dict[str, Any] = {
            "username": conn.username or None,
            "password": conn.password or None,
            "db": int(conn.db or 0),
        }
        if kind is UnixDomainSocketConnection:
            return cls(path=conn.path, **common)
        context = conn.ssl_context.get() if kind is SSLConnection else None
        return cls(host=conn.host, port=int(conn.port), ssl=context, **common)


class Waiter:
    """One expected reply, resolved exactly once with the reply or an exception instance."""

    __slots__ = ("deadline",)

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # loop time

    def resolve(self, reply: Any) -> None:
        raise NotImplementedError


class FutureWaiter(Waiter):
    """A reply delivered to a future (an error reply or a failure is set as its exception)."""

    __slots__ = ("future",)

    def __init__(self, deadline: float, future: asyncio.Future[Any]) -> None:
        super().__init__(deadline)
        self.future = future

    def resolve(self, reply: Any) -> None:
        if self.future.done():
            return
        if isinstance(reply, BaseException):
            self.future.set_exception(reply)
        else:
            self.future.set_result(reply)


class _Handshake(Waiter):
    """The reply to AUTH or SELECT: an error fails the connection."""

    __slots__ = ("command", "conn")

    def __init__(self, deadline: float, conn: _Connection, command: str) -> None:
        super().__init__(deadline)
        self.conn = conn
        self.command = command

    def resolve(self, reply: Any) -> None:
        if isinstance(reply, BaseException):
            kind = AuthenticationError if self.command == "AUTH" else RedisConnectionError
            self.conn.fail(kind, f"{self.command} refused by {self.conn.endpoint}: {reply}")


class _Connection(asyncio.Protocol):
    """One connection: its transport, its reply parser and its queue of waiters."""

    def __init__(self, client: RespClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.endpoint = client.endpoint
        self.loop = loop
        self.closed = False
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._waiters: deque[Waiter] = deque()
        self._transport: asyncio.Transport | None = None
        self._unsent: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._connector: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ sending

    def send(self, payload: bytes, waiter: Waiter) -> None:
        self._waiters.append(waiter)
        transport = self._transport
        if transport is not None:
            transport.write(payload)
        else:
            self._unsent.append(payload)
        if waiter.deadline < self._timer_at:
            self._arm(waiter.deadline)

    def send_many(self, payload: bytes, waiters: Sequence[Waiter]) -> None:
        self._waiters.extend(waiters)
        if self._transport is not None:
            self._transport.write(payload)
        else:
            self._unsent.append(payload)
        due = min(w.deadline for w in waiters)
        if due < self._timer_at:
            self._arm(due)

    # ------------------------------------------------------------------ deadlines

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.closed or not self._waiters:
            return
        due = min(w.deadline for w in self._waiters)
        if due <= self.loop.time():
            self.fail(RedisTimeoutError, f"no reply from {self.endpoint} in time")
        else:
            self._arm(due)

    # ------------------------------------------------------------------ connecting

    def open(self, timeout_s: float) -> None:
        self._connector = self.loop.create_task(self._connect(timeout_s))

    async def _connect(self, timeout_s: float) -> None:
        ep = self.endpoint
        try:
            async with asyncio.timeout(timeout_s):
                if ep.path is not None:
                    await self.loop.create_unix_connection(lambda: self, ep.path)
                else:
                    await self.loop.create_connection(
                        lambda: self,
                        ep.host,
                        ep.port,
                        ssl=ep.ssl,
                        server_hostname=ep.host if ep.ssl is not None else None,
                    )
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.fail(RedisConnectionError, f"Error connecting to {ep}: {reason}")
        finally:
            self._connector = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: Any = transport  # a stream transport (asyncio's, uvloop's, or TLS)
        if self.closed:
            stream.abort()
            return
        self._transport = stream
        sock = stream.get_extra_info("socket")
        if sock is not None and self.endpoint.path is None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        ep = self.endpoint
        deadline = self.loop.time() + self.client.connect_timeout_s
        first: list[Waiter] = []
        head = b""
        if ep.password is not None:
            auth = ("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password)
            head += pack_command(*auth)
            first.append(_Handshake(deadline, self, "AUTH"))
        if ep.db:
            head += pack_command("SELECT", ep.db)
            first.append(_Handshake(deadline, self, "SELECT"))
        self._waiters.extendleft(reversed(first))
        unsent, self._unsent = self._unsent, []
        if head or unsent:
            stream.write(head + b"".join(unsent))
        if first and deadline < self._timer_at:
            self._arm(deadline)

    # ------------------------------------------------------------------ receiving

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._waiters
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError, f"protocol error from {self.endpoint}: {exc}")
                return
            if reply is False:
                return
            if not waiters:
                self.fail(RedisConnectionError, f"unexpected reply from {self.endpoint}")
                return
            waiters.popleft().resolve(reply)
            if self.closed:  # a handshake reply failed the connection
                return

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc is not None else ""
        self.fail(RedisConnectionError, f"connection to {self.endpoint} lost{reason}")

    # ------------------------------------------------------------------ failing

    def fail(self, kind: type[Exception], message: str) -> None:
        """Drop the connection and fail every waiter it holds (once; later calls no-op)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._connector is not None and self._connector is not asyncio.current_task():
            self._connector.cancel()
        if self._transport is not None:
            self._transport.abort()
        self._unsent.clear()
        waiters = self._waiters
        while waiters:
            waiters.popleft().resolve(kind(message))


class RespClient:
    """Commands to one standalone Redis over one pipelined connection, reopened as needed."""

    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float = 0.25) -> None:
        if connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be > 0")
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self._conn: _Connection | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        """Whether a connection is open (not merely being opened)."""
        conn = self._conn
        return conn is not None and not conn.closed and conn._transport is not None

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = _Connection(self, asyncio.get_running_loop())
            conn.open(self.connect_timeout_s)
        return conn

    def connect_soon(self) -> None:
        """Start opening a connection now (without waiting for it), if none is open."""
        if not self._closed:
            self._connection()

    def send(self, payload: bytes, waiter: Waiter) -> None:
        """Write one packed command; ``waiter`` gets its reply."""
        if self._closed:
            waiter.resolve(RedisConnectionError("the Redis client is closed"))
            return
        self._connection().send(payload, waiter)

    def send_many(self, payload: bytes, waiters: Sequence[Waiter]) -> None:
        """Write several packed commands at once; one waiter per command, in order."""
        if self._closed:
            for waiter in waiters:
                waiter.resolve(RedisConnectionError("the Redis client is closed"))
            return
        self._connection().send_many(payload, waiters)

    async def execute(self, *args: Arg, timeout_s: float) -> Any:
        """Send one command and wait for its reply; an error reply is raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.send(pack_command(*args), FutureWaiter(loop.time() + timeout_s, future))
        return await future

    async def aclose(self) -> None:
        """Close the connection; commands still waiting fail with ``ConnectionError``."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(RedisConnectionError, "the Redis client is closed")
