"""One connection to the upstream: the request written, the answer parsed as it arrives.

The connection is an asyncio protocol with llhttp (through ``httptools``) as its parser;
:mod:`gateway.upstream.pool` keeps these connections and hands them to exchanges.

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
from collections.abc import Callable
from typing import Final

import httptools

from gateway.core.fieldnames import NameTable

_HIGH_WATER: Final = 1 << 20  # pause reading the upstream above this much unread body
_NAMES: Final = NameTable()  # the field names of the answers of every upstream connection
MAX_RESPONSE_FIELDS: Final = 100  # as Envoy's default; a response head with more is refused
DEFAULT_MAX_HEAD_BYTES: Final = 65536
HEAD_TOO_LARGE: Final = "response_head_too_large"  # the UpstreamError kind
_PLAIN: Final = frozenset((b"keep-alive", b"close"))  # Connection values that name no other field


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


class UpstreamConnection(asyncio.Protocol):
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
        "_parse_failure",
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
        self._parse_failure: Exception | None = None  # what a callback raised
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
            # the callback's exception, kept by it: llhttp raises its own, and implicit
            # chaining would not carry it reliably (another handled exception may be
            # current in a compiled build)
            cause, self._parse_failure = self._parse_failure, None
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

    def _failing(self, exc: Exception) -> Exception:
        """``exc``, raised out of a parser callback, kept as the parser error's cause."""
        self._parse_failure = exc
        return exc

    def on_message_begin(self) -> None:
        if self.complete:
            # a second answer to one request, or bytes on an idle connection: the upstream
            # is out of step, and whatever it sends next would reach the wrong client
            raise self._failing(_OutOfStepError())
        self._status = b""
        self._headers = []
        self.listed = False

    def on_status(self, status: bytes) -> None:
        self._status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._awaiting_head:
            return  # a trailer field: dropped (its bytes are bounded with the chunk lines)
        headers = self._headers
        headers.append((_NAMES.name(name, len(headers)), value.decode("latin-1")))
        if len(headers) > MAX_RESPONSE_FIELDS:
            raise self._failing(
                _HeadTooLargeError(f"response head with over {MAX_RESPONSE_FIELDS} fields")
            )
        # (the usual spellings are compared as they are, before any lower-casing)
        size = len(name)
        if size == 10 and (name == b"Connection" or name.lower() == b"connection"):
            if value != b"keep-alive" and value.lower() not in _PLAIN:
                self.listed = True  # Connection names other fields: they are hop-by-hop too
        elif (
            size == 17
            and (name == b"Transfer-Encoding" or name.lower() == b"transfer-encoding")
            and value != b"chunked"
            # (llhttp reads trailing spaces as chunked, a trailing tab as another coding)
            and value.rstrip(b" ").lower() != b"chunked"
        ):
            # gzip, compress...: the gateway asks for none (it sends no TE field), and it
            # frames answers anew, so the coding would be lost: the body would reach the
            # client still coded with nothing saying so
            raise self._failing(_CodedError())

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
                raise self._failing(
                    _HeadTooLargeError(f"response head over {self._max_head} bytes")
                )
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
        if self._body_waiter is not None:  # (a body read as it comes: no call otherwise)
            self._wake_body()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        if self._body_waiter is not None:
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
        self.buffered = 0
        if self._reading_paused:  # (as _emptied, without its call when not paused)
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
