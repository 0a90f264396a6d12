"""The lean upstream client against raw TCP upstreams that misbehave on purpose."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from yarl import URL

from gateway.upstream.pool import LeanPool, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TWO_CODING_LINES = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n"
)


async def _serve(handler: Handler) -> tuple[asyncio.Server, int, list[int]]:
    conns: list[int] = []

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def _read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


async def _fetch(pool: LeanPool) -> bytes:
    resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
    body = await _body(resp.iter_body())
    resp.release()
    return body


def _pool(port: int, *, limit: int = 10, timeout_s: float = 5) -> LeanPool:
    return LeanPool(
        URL(f"http://127.0.0.1:{port}"), limit=limit, connect_timeout_s=1, timeout_s=timeout_s
    )


async def _body(resp_iter: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in resp_iter])


async def test_keepalive_reuse_and_stale_connection_is_retried() -> None:
    served = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_head(r)
        w.write(OK)
        await w.drain()
        served += 1
        # close the idle keep-alive connection behind the client's back
        await asyncio.sleep(0.05)

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        resp = await pool.request("GET", "/a", [("Host", "x")], None, chunked=False)
        assert resp.status == 200
        assert await _body(resp.iter_body()) == b"ok"
        resp.release()
        await asyncio.sleep(0.2)  # the server closed it
        resp = await pool.request("GET", "/b", [("Host", "x")], None, chunked=False)
        assert resp.status == 200
        resp.release()
        assert served == 2
    finally:
        await pool.close()
        server.close()


async def test_pool_limit_queues_requests_on_one_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await _read_head(r)
            await asyncio.sleep(0.02)
            w.write(OK)
            await w.drain()

    server, port, conns = await _serve(handler)
    pool = _pool(port, limit=1)

    async def one() -> int:
        resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        await _body(resp.iter_body())
        resp.release()
        return resp.status

    try:
        assert await asyncio.gather(*(one() for _ in range(5))) == [200] * 5
        assert len(conns) == 1
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "protocol"),
        (b"NOT HTTP AT ALL\r\n\r\n", "protocol"),
        (b"", "protocol"),
        # a coding other than chunked is not passed on: not a body that ends at the close
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nx\x9c\x03\x00", "protocol"),
        # chunked last: the framing is clear, but the body is still coded once unchunked
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "protocol"),
        (TWO_CODING_LINES, "protocol"),
        # the field's name and value in other spellings than the usual ones
        (b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: Gzip\r\n\r\nx", "protocol"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n0\r\n\r\n", "protocol"),
    ],
    ids=[
        "truncated-body",
        "garbage",
        "closed-at-once",
        "transfer-coding-gzip",
        "gzip-then-chunked",
        "two-coding-lines",
        "transfer-coding-upper-case",
        "chunked-then-identity",
    ],
)
async def test_broken_answers_are_upstream_errors(answer: bytes, kind: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(answer)
        await w.drain()

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        with pytest.raises(UpstreamError) as info:
            await _fetch(pool)
        assert info.value.kind == kind
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize("coding", [b"chunked\t", b"chunked \t"], ids=["tab", "space-and-tab"])
async def test_a_coding_the_parser_does_not_read_as_chunked_is_refused_with_the_head(
    coding: bytes,
) -> None:
    """llhttp reads ``chunked`` followed by a tab as no chunked coding (a body that ends at
    the close): such an answer is refused with its head, before any of it is passed on,
    never framed anew with its chunk lines as the body."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + coding + b"\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        await asyncio.sleep(5)  # the connection stays open: the body has not ended

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        with pytest.raises(UpstreamError) as info:
            async with asyncio.timeout(2):
                await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        assert info.value.kind == "protocol"
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize(
    ("fields", "listed", "body"),
    [
        (b"Connection: keep-alive\r\nContent-Length: 2", False, b"ok"),
        (b"CONNECTION: Keep-Alive\r\nContent-Length: 2", False, b"ok"),
        (b"connection: CLOSE\r\nContent-Length: 2", False, b"ok"),
        (b"Connection: X-Hop\r\nX-Hop: 1\r\nContent-Length: 2", True, b"ok"),
        (b"CONNECTION: x-hop\r\nX-Hop: 1\r\nContent-Length: 2", True, b"ok"),
        (b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 2", True, b"ok"),
        (b"Connection: keep-alive\r\nConnection: X-Hop\r\nContent-Length: 2", True, b"ok"),
        (b"transfer-encoding: Chunked\r\n\r\n2\r\nok\r\n0", False, b"ok"),
        (b"TRANSFER-ENCODING: CHUNKED\r\n\r\n2\r\nok\r\n0", False, b"ok"),
        (b"Transfer-Encoding: chunked  \r\n\r\n2\r\nok\r\n0", False, b"ok"),
    ],
    ids=[
        "keep-alive",
        "keep-alive-other-case",
        "close-other-case",
        "names-a-field",
        "names-a-field-upper-case",
        "keep-alive-and-a-field",
        "two-connection-lines",
        "chunked-other-case",
        "chunked-upper-case",
        "chunked-then-spaces",
    ],
)
async def test_connection_and_coding_fields_in_any_spelling(
    fields: bytes, listed: bool, body: bytes
) -> None:
    """Connection and Transfer-Encoding are read alike in whatever letter case the
    upstream spells them: a Connection that names fields marks them hop-by-hop, chunked
    is the only coding passed."""
    answer = (
        b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n\r\n" + body * (b"chunked" not in fields.lower())
    )

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(answer)
        await w.drain()
        await asyncio.sleep(0.5)

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        assert resp.listed is listed
        assert await _body(resp.iter_body()) == body
        resp.release()
    finally:
        await pool.close()
        server.close()


async def test_timeout_and_refused_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        await asyncio.sleep(5)

    server, port, _ = await _serve(handler)
    pool = _pool(port, timeout_s=0.2)
    try:
        with pytest.raises(UpstreamError) as info:
            await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        assert info.value.kind == "timeout"
    finally:
        await pool.close()
        server.close()
    await server.wait_closed()
    refused = _pool(port)
    with pytest.raises(UpstreamError) as info:
        await refused.request("GET", "/", [("Host", "x")], None, chunked=False)
    assert info.value.kind == "connect"
    assert info.value.sent is False


async def test_deadline_covers_the_body_and_the_sweep_stops_when_idle() -> None:
    loop = asyncio.get_running_loop()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_head(r)
            if b"GET /stall" in head:
                # the head and part of the body, then nothing
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
                await w.drain()
                await asyncio.sleep(5)
            w.write(OK)
            await w.drain()

    server, port, _ = await _serve(handler)
    pool = _pool(port, timeout_s=0.3)
    try:
        assert await _fetch(pool) == b"ok"
        t0 = loop.time()  # the deadline runs from the request on
        resp = await pool.request("GET", "/stall", [("Host", "x")], None, chunked=False)
        with pytest.raises(UpstreamError) as info:
            await _body(resp.iter_body())
        waited = loop.time() - t0
        resp.release()
        assert info.value.kind == "timeout"
        # 0.3 s, checked every 0.03 s (a tenth of the timeout); the stall lasts 5 s
        assert 0.25 < waited < 1.0, waited
        # a fresh connection serves the next request; with none in progress the sweep stops
        assert await _fetch(pool) == b"ok"
        await asyncio.sleep(0.1)
        assert pool._sweeper is None
    finally:
        await pool.close()
        server.close()


async def test_chunked_request_body_is_encoded() -> None:
    got = asyncio.get_running_loop().create_future()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await _read_head(r)
        body = await r.readuntil(b"0\r\n\r\n")
        got.set_result((head, body))
        w.write(OK)
        await w.drain()

    async def gen() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b" world!"

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        resp = await pool.request("POST", "/p", [("Host", "x")], gen(), chunked=True)
        resp.release()
        head, body = await got
        assert b"Transfer-Encoding: chunked\r\n" in head
        assert body == b"5\r\nhello\r\n7\r\n world!\r\n0\r\n\r\n"
    finally:
        await pool.close()
        server.close()


async def test_large_response_streams_with_back_pressure() -> None:
    size = 8 * 1024 * 1024

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            w.write(b"x" * 65536)
            await w.drain()

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        total = 0
        async for chunk in resp.iter_body():
            total += len(chunk)
            await asyncio.sleep(0)  # a slow reader
        resp.release()
        assert total == size
    finally:
        await pool.close()
        server.close()


async def test_interim_1xx_answers_are_skipped_and_the_connection_stays_in_step() -> None:
    """A 103/100/102 before the answer is not the answer: taking it as one would pool the
    connection mid-exchange and hand this answer to the next request."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await _read_head(r)
            path = head.split(b" ")[1]
            if path == b"/first":
                w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
                w.write(b"HTTP/1.1 102 Processing\r\n\r\n")
                await w.drain()
                await asyncio.sleep(0.05)
            body = b"answer for " + path
            w.write(b"HTTP/1.1 200 OK\r\nX-Path: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                path, len(body), body))  # fmt: skip
            await w.drain()

    server, port, conns = await _serve(handler)
    pool = _pool(port, limit=1)
    try:
        for path in ("/first", "/second"):
            resp = await pool.request("GET", path, [("Host", "x")], None, chunked=False)
            assert resp.status == 200
            assert resp.reason == "OK"
            assert resp.header_list[0] == ("X-Path", path)  # none of the 1xx fields
            assert await _body(resp.iter_body()) == b"answer for " + path.encode()
            resp.release()
        assert len(conns) == 1  # the connection stayed usable
    finally:
        await pool.close()
        server.close()


async def test_bytes_after_the_answer_retire_the_connection() -> None:
    """An upstream that sends a second answer (or anything) when none is due is out of
    step: its connection is closed, never given to the next request."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
        w.write(OK + extra)  # one answer too many
        await w.drain()
        await asyncio.sleep(5)

    server, port, conns = await _serve(handler)
    pool = _pool(port, limit=1)
    try:
        assert await _fetch(pool) == b"ok"
        assert await _fetch(pool) == b"ok"  # a fresh connection, not the stale answer
        assert len(conns) == 2
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n", b"HTTP/1.0 200 OK\r\n"],
    ids=["http11-no-length", "http10"],
)
async def test_an_answer_delimited_by_the_close_is_whole(head: bytes) -> None:
    """No Content-Length, not chunked: the body ends where the upstream closes (RFC 9112
    6.3 rule 8), in several writes; the connection is not reused."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(head + b"\r\n" + b"a" * 70_000)
        await w.drain()
        await asyncio.sleep(0.02)
        w.write(b"b" * 10)
        await w.drain()

    server, port, conns = await _serve(handler)
    pool = _pool(port)
    try:
        assert await _fetch(pool) == b"a" * 70_000 + b"b" * 10
        assert await _fetch(pool) == b"a" * 70_000 + b"b" * 10
        assert len(conns) == 2
    finally:
        await pool.close()
        server.close()


async def test_a_reset_cuts_an_answer_delimited_by_the_close() -> None:
    """A reset is not the close that ends such a body: the answer is an error, not a
    shorter body passed on as whole."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"a" * 1000)
        await w.drain()
        await asyncio.sleep(0.05)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST instead of FIN

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        with pytest.raises(UpstreamError) as info:
            await _fetch(pool)
        assert info.value.kind == "protocol"
    finally:
        await pool.close()
        server.close()


# ----------------------------------------------------------------- bounded answers

_FIELD = b"X-F: v\r\n"  # 8 bytes


@pytest.mark.parametrize(
    ("answer", "limited"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 200_000 + b"\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\n" + _FIELD * 20_000 + b"Content-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\n" + _FIELD * 100 + b"Content-Length: 2\r\n\r\nok", True),  # 101
        (b"HTTP/1.1 200 OK\r\n" + _FIELD * 99 + b"Content-Length: 2\r\n\r\nok", False),  # 100
        (b"HTTP/1.1 200 " + b"O" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 65_600 + b"\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 64_000 + b"\r\nContent-Length: 2\r\n\r\nok", False),
        # interim answers are heads too
        (b"HTTP/1.1 103 Early Hints\r\n" + _FIELD * 200 + b"\r\n" + OK, True),
        # and their bytes add up: an endless stream of small ones is no way around it
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" * 2000 + OK, True),
    ],
    ids=[
        "one-200k-field",
        "20000-fields",
        "101-fields",
        "100-fields",
        "long-status-line",
        "just-over-64k",
        "just-under-64k",
        "interim-with-many-fields",
        "2000-interim-answers",
    ],
)
async def test_a_response_head_over_the_bounds_is_refused_and_its_connection_closed(
    answer: bytes, *, limited: bool
) -> None:
    closed = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await _read_head(r)
            w.write(answer)
            await w.drain()
            await r.read()  # until the client closes its end
        finally:
            closed.set()

    server, port, conns = await _serve(handler)
    pool = _pool(port)
    try:
        if not limited:
            resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
            assert resp.status == 200
            assert await _body(resp.iter_body()) == b"ok"
            resp.release()
            return
        with pytest.raises(UpstreamError) as info:
            await _fetch(pool)
        assert info.value.kind == "response_head_too_large"
        assert info.value.sent is True
        await asyncio.wait_for(closed.wait(), 2)  # not kept for another exchange
        assert await _connections_after_one_more(pool, conns) == 2
    finally:
        await pool.close()
        server.close()


async def _connections_after_one_more(pool: LeanPool, conns: list[int]) -> int:
    """Connections opened once one more exchange was tried (a refused one is never reused)."""
    with pytest.raises(UpstreamError):
        await _fetch(pool)  # the same upstream answers the same way, on a new connection
    return len(conns)


async def test_a_response_head_that_drips_is_bounded_by_size_then_by_time() -> None:
    """A head sent a little at a time is refused once it is over the bound, without
    waiting for its end; one that stays small and never ends meets the timeout."""

    async def big_drip(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        for _ in range(200):
            w.write(b"d" * 1000)
            await w.drain()
            await asyncio.sleep(0.005)
        await asyncio.sleep(10)

    async def slow_drip(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\n")
        while True:
            w.write(b"X: y\r\n")
            await w.drain()
            await asyncio.sleep(0.05)

    loop = asyncio.get_running_loop()
    for handler, kind, bound_s in (
        (big_drip, "response_head_too_large", 1.5),
        (slow_drip, "timeout", 1.5),
    ):
        server, port, _ = await _serve(handler)
        pool = _pool(port, timeout_s=0.5 if kind == "timeout" else 5)
        t0 = loop.time()
        try:
            with pytest.raises(UpstreamError) as info:
                await _fetch(pool)
            assert info.value.kind == kind
            assert loop.time() - t0 < bound_s
        finally:
            await pool.close()
            server.close()


async def test_trailer_fields_never_join_the_response_head() -> None:
    """RFC 9110 6.5.1: a trailer field is not a header field (a trailing Set-Cookie
    must not become one of the answer's fields)."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\nSet-Cookie: evil=1\r\nX-Trailer: t\r\n\r\n"
        )
        await w.drain()
        await r.read()

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        await asyncio.sleep(0.05)  # the trailer is in
        assert resp.body_if_complete() == b"ok"
        assert [n for n, _ in resp.header_list] == ["Transfer-Encoding"]
        resp.release()
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize(
    "tail",
    [
        b"X-T: " + b"t" * 200_000,  # one huge trailer field, dripped, never ended
        b"X-T: t\r\n" * 20_000 + b"\r\n",  # many trailer fields
        b"",  # chunk extensions: framing without data
    ],
    ids=["huge-trailer", "many-trailers", "chunk-extensions"],
)
async def test_trailers_and_chunk_lines_are_bounded_like_the_head(tail: bytes) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        if tail:
            rest = b"0\r\n" + tail
        else:
            rest = b"".join(b"1;" + b"e" * 1000 + b"\r\nx\r\n" for _ in range(200))
        for i in range(0, len(rest), 4096):
            w.write(rest[i : i + 4096])
            await w.drain()
            await asyncio.sleep(0.001)
        await asyncio.sleep(10)

    server, port, _ = await _serve(handler)
    pool = _pool(port)
    try:
        resp = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        with pytest.raises(UpstreamError) as info:
            await asyncio.wait_for(_body(resp.iter_body()), 3)
        assert info.value.kind == "response_head_too_large"
        resp.release()
    finally:
        await pool.close()
        server.close()


async def test_a_complete_answer_frees_its_connection_while_its_reader_is_busy() -> None:
    body = bytes(i % 251 for i in range(300_000))

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await _read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body[:1000]))
            await w.drain()
            await asyncio.sleep(0.1)  # the rest comes while the reader is busy elsewhere
            w.write(body[1000:])
            await w.drain()

    server, port, conns = await _serve(handler)
    pool = _pool(port, limit=1)
    try:
        first = await pool.request("GET", "/", [("Host", "x")], None, chunked=False)
        parts = first.iter_body()
        start = await anext(parts)  # then the reader (a slow client's writes) is busy
        # the answer is all in: the one connection is back in the pool, for the next
        second = await asyncio.wait_for(
            pool.request("GET", "/", [("Host", "x")], None, chunked=False), 1
        )
        assert await _body(second.iter_body()) == body
        second.release()
        assert start + await _body(parts) == body  # the first is whole all the same
        first.release()
        assert len(conns) == 1
    finally:
        await pool.close()
        server.close()
