"""The proxy port's messages: requests as they are read, answers as they are written.

:class:`Request` is one request with the gateway's per-request state and the means to
answer it (a whole :class:`Response`, or a stream); :class:`Body` its body as it arrives,
read with back-pressure (reading from the client pauses above a high mark of unread
bytes). :func:`to_web` and :func:`from_web` translate to and from aiohttp's responses,
for the requests the upgrade hand-off serves and the shared code that answers with them.
They talk to their connection through :class:`Connection` only, so the types do not
depend on the protocol that reads them.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from aiohttp import web
from multidict import CIMultiDict, MultiDict, MultiDictProxy, istr
from yarl import URL

from gateway.problem import PHRASES

if TYPE_CHECKING:
    from gateway.batchwrite import WriteBatcher
    from gateway.core.client_ip import IPAddress
    from gateway.downstream.head import HostCache
    from gateway.downstream.live import AnswerHeaders, Live
    from gateway.lifecycle import Lifecycle

__all__ = [
    "NO_BODY",
    "AnyResponse",
    "Body",
    "BodyError",
    "Connection",
    "Request",
    "Response",
    "ServerSide",
    "from_web",
    "status_line",
    "to_web",
]

_BODY_HIGH: Final = 256 * 1024  # pause reading the client above this much unread body
NO_BODY_STATUS: Final = frozenset((204, 304))
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# field names looked up as istr: a plain str is case-folded anew on every lookup
_CONTENT_LENGTH: Final = istr("Content-Length")
_TRANSFER_ENCODING: Final = istr("Transfer-Encoding")

_PHRASES: Final = PHRASES  # (a Final name is read directly in the compiled build)
_STATUS_LINES: Final[dict[int, bytes]] = {
    code: f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1") for code, phrase in PHRASES.items()
}


class Writer(Protocol):
    """What a request's answer needs of the server: its write queue and its head rendering."""

    batcher: WriteBatcher

    def render_head(self, req: Request, resp: Response, body_len: int | None) -> bytes: ...


class Connection(Protocol):
    """What a request and its body need of the connection they came on."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def transport(self) -> asyncio.Transport | None: ...
    @property
    def server(self) -> Writer: ...
    @property
    def peer(self) -> tuple[IPAddress | None, str] | None:
        """:meth:`peer_address` once it was asked (None before)."""
        ...

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    async def drain(self) -> None: ...
    def peer_address(self) -> tuple[IPAddress | None, str]: ...


C = TypeVar("C")


class ServerSide(Writer, Protocol[C]):
    """What a connection (``C``) needs of the server that made it: the handler, the
    current config, the drain, the connection set and the answers it writes."""

    loop: asyncio.AbstractEventLoop
    handler: Callable[[Request], Coroutine[Any, Any, AnyResponse]]
    answer_now: Callable[[Request], AnyResponse | None]
    finished: Callable[[Request, AnyResponse | None], None] | None
    max_header_bytes: int
    live: Callable[[], Live]
    body_idle_s: Callable[[], float]  # the current ``live().body_idle_s`` (one callable for all)
    lifecycle: Lifecycle
    connections: set[C]
    hosts: HostCache

    @property
    def upgrade_server(self) -> Callable[[], asyncio.Protocol]: ...
    def on_parser_error(self, protocol: C, status: int) -> None: ...
    def internal_error(self, req: Request) -> Response: ...
    def write_response(
        self,
        req: Request,
        resp: AnyResponse,
        transport: asyncio.Transport,
        *,
        at_once: bool = False,
    ) -> bool: ...


def _phrase(status: int) -> str:
    return _PHRASES.get(status, "Unknown")


def status_line(status: int, reason: str | None) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is not None and (not reason or reason == _PHRASES[status]):
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

    def __init__(self, proto: Connection) -> None:
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


NO_BODY: Final = _NoBody()


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
        "header_fields",
        "headers",
        "host",
        "https",
        "keep_alive",
        "method",
        "path",
        "pending_record",
        "protocol",
        "raw_path",
        "response_headers",
        "rid",
        "version",
    )

    def __init__(  # noqa: PLR0917 - built in one place, by the protocol
        self,
        protocol: Connection,
        method: str,
        target: str,
        version: str,
        headers: CIMultiDict[str],
        header_bytes: int,
        keep_alive: bool,
        host: str | None = None,
        fields: list[tuple[str, str]] | None = None,
    ) -> None:
        self.protocol = protocol
        # the host it is for (lower-case, no port or trailing dot, IPv6 unbracketed)
        self.host = host
        self.method = method
        self.raw_path = target
        self.version = version
        self.headers = headers
        # the fields in the order they came (``headers`` is made of them): walked whole
        # faster than the multidict
        self.header_fields = list(headers.items()) if fields is None else fields
        self.header_bytes = header_bytes
        self.keep_alive = keep_alive
        if target[:1] == "/":
            query_at = target.find("?")  # (no tuple and no third string, as partition makes)
            path = target if query_at < 0 else target[:query_at]
            if "%" in path:
                path = URL.build(path=path, encoded=True).path
            self.path = path
            self._rel_url: URL | None = None
        else:
            self._rel_url = URL(target, encoded=True).relative()
            self.path = self._rel_url.path
        self._query: MultiDictProxy[str] | None = None
        cl = headers.get(_CONTENT_LENGTH)
        self.content_length = int(cl) if cl is not None else None
        te = headers.get(_TRANSFER_ENCODING)
        self.body_exists = bool(self.content_length) or te is not None
        if te is not None and version == "1.0":
            self.keep_alive = False  # its framing is faulty: close after it (RFC 9112 6.1)
        self.content: Body | _NoBody = Body(protocol) if self.body_exists else NO_BODY
        self.rid: str | None = None
        self.response_headers: AnswerHeaders | None = None
        self.https = False
        self.extra_headers: list[tuple[str, str]] | None = None
        # what the pipeline keeps to record the request once its answer is written
        self.pending_record: object | None = None
        self.head_sent = False
        self._stream_mode = 0  # 0 raw, 1 chunked, 2 no body (HEAD, 204, 304)

    # what the pipeline reads of a request (gateway.pipeline.request.PipelineRequest)
    fields_decoded = False  # field values are kept as sent (latin-1)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    def peer_address(self) -> tuple[IPAddress | None, str]:
        peer = self.protocol.peer  # (known after a connection's first request: no call)
        return peer if peer is not None else self.protocol.peer_address()

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
        if status in NO_BODY_STATUS or self.method == "HEAD" or status < 200:
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
