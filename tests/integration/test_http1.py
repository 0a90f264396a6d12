"""The proxy port's HTTP/1.1 server on its own, with a small handler, over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.batchwrite import SERVING
from gateway.downstream.messages import Request, Response
from gateway.downstream.protocol import HttpProtocol
from gateway.downstream.server import HttpServer
from gateway.downstream.upgrade import GatewayRequest, GatewayServer
from tests.gw import raw_exchange, wait_for

pytestmark = pytest.mark.asyncio


BIG = b"x" * 262_144
CANCELLED: list[str] = []


async def _handler(request: Request) -> Response | web.Response:
    path = request.path
    if path == "/now":  # as the gateway's handler does for probes that had to queue
        return Response(200, None, [], b"now (queued)")
    if path == "/boom":
        msg = "handler bug"
        raise RuntimeError(msg)
    if path == "/reject":  # answers without reading the body
        return Response(413, None, [("Content-Type", "text/plain")], b"too big")
    if path == "/stream":
        await request.start_stream(200, None, [("Content-Type", "text/plain")])
        for part in (b"one,", b"two,", b"three"):
            await request.write(part)
        await request.write_eof()
        return Response(200, None, [], None)
    if path == "/echo":
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
        return Response(200, None, [("Content-Type", "text/plain")], str(size).encode())
    if path == "/slow":
        await asyncio.sleep(0.3)
    if path == "/busy":  # CPU work that holds the loop
        time.sleep(0.1)
    if path == "/slow-big":  # an answer that stays in the send buffer of a slow reader
        await asyncio.sleep(0.3)
        return Response(200, None, [("Content-Type", "text/plain")], BIG * 32)
    if path == "/big":  # as a proxied answer: the loop turns while it is fetched
        await asyncio.sleep(0)
        return Response(200, None, [("Content-Type", "text/plain")], BIG)
    if path == "/forever":
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            CANCELLED.append(path)
            raise
    return Response(200, None, [("Content-Type", "text/plain")], ("path=" + path).encode())


def _answer_now(request: Request) -> Response | None:
    if request.path == "/probe-bug":
        msg = "probe bug"
        raise RuntimeError(msg)
    if request.path == "/now":
        return Response(200, None, [("Content-Type", "text/plain")], b"now")
    return None


async def _ws_handler(request: GatewayRequest) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await ws.send_str("echo:" + msg.data)
    return ws


@asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[tuple[HttpServer, int, list[int]]]:
    errors: list[int] = []
    opts: dict[str, Any] = {
        "client_timeout_s": 5.0,
        "max_header_bytes": 4096,
        "static_headers": "X-Frame-Options: DENY\r\n",
        "on_parser_error": lambda _p, status: errors.append(status),
    }
    opts.update(kwargs)
    keepalive = opts.pop("keepalive_s", 75.0)
    upgrades = GatewayServer(_ws_handler, **opts)
    server = HttpServer(
        _handler,
        upgrade_server=upgrades,
        keepalive_s=keepalive,
        answer_now=_answer_now,
        **opts,
    )
    listener = await asyncio.get_running_loop().create_server(
        server.protocol_factory, "127.0.0.1", 0
    )
    port = int(listener.sockets[0].getsockname()[1])
    try:
        yield server, port, errors
    finally:
        listener.close()
        server.close()
        await upgrades.shutdown(0.5)


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split raw Content-Length-framed responses."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(
            port,
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    answers = _responses(raw)
    assert [b for _, _, b in answers] == [b"path=/slow", b"path=/two", b"path=/three"]
    assert answers[-1][1]["connection"] == "close"


async def test_head_sent_byte_by_byte_is_served() -> None:
    async with serving() as (_, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for b in b"GET /bytes HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n":
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.001)
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    ((status, headers, body),) = _responses(raw)
    assert (status, body) == (200, b"path=/bytes")
    assert "date" in headers
    assert "server" not in headers


async def test_incomplete_head_gets_408_after_the_client_timeout() -> None:
    async with serving(client_timeout_s=0.3) as (_, port, errors):
        t0 = asyncio.get_running_loop().time()
        raw = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n", wait_s=3)
        took = asyncio.get_running_loop().time() - t0
    ((status, headers, body),) = _responses(raw)
    assert status == 408
    assert 0.25 < took < 2.5
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert headers["x-frame-options"] == "DENY"
    assert json.loads(body)["request_id"] == headers["x-request-id"]
    assert errors == [408]


async def test_oversized_head_and_too_many_fields_get_431() -> None:
    async with serving() as (_, port, errors):
        big = await raw_exchange(
            port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 5000 + b"\r\n\r\n"
        )
        many = b"".join(b"X-F%d: v\r\n" % i for i in range(300))
        fields = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
        ok = await raw_exchange(
            port,
            b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: "
            + b"v" * 3000
            + b"\r\n\r\n",
        )
    assert _responses(big)[0][0] == 431
    assert _responses(fields)[0][0] == 431
    assert _responses(ok)[0][:3:2] == (200, b"path=/ok")
    assert errors == [431, 431]


async def test_garbage_gets_problem_400_and_the_connection_closes() -> None:
    async with serving() as (_, port, errors):
        raw = await raw_exchange(port, b"HELLO THERE\r\n\r\nGET / HTTP/1.1\r\n\r\n", wait_s=2)
    answers = _responses(raw)
    assert len(answers) == 1  # nothing after the bad request is served
    status, _, body = answers[0]
    assert status == 400
    assert json.loads(body)["status"] == 400
    assert errors == [400]


async def test_http10_closes_unless_keep_alive_is_asked() -> None:
    async with serving() as (_, port, _errors):
        plain = await raw_exchange(port, b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
        kept = await raw_exchange(
            port,
            b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        )
    assert [b for _, _, b in _responses(plain)] == [b"path=/a"]
    answers = _responses(kept)
    assert [b for _, _, b in answers] == [b"path=/a", b"path=/b"]
    assert answers[0][1]["connection"] == "keep-alive"


async def test_http10_with_transfer_encoding_is_answered_then_closed() -> None:
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing; it is
    served, then the connection closes (what follows is not read as a request)."""
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(
            port,
            b"POST /echo HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        )
    answers = _responses(raw)
    assert [b for _, _, b in answers] == [b"3"]
    assert answers[0][1].get("connection") != "keep-alive"


async def test_head_request_gets_length_but_no_body() -> None:
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(
            port,
            b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 7" in head.split(b"\r\n")  # len("path=/h")
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # the next answer follows at once
    assert rest.endswith(b"path=/after")


async def test_streamed_answer_is_chunked_for_11_and_raw_then_close_for_10() -> None:
    async with serving() as (_, port, _errors):
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/stream") as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert await r.read() == b"one,two,three"
        raw10 = await raw_exchange(port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = raw10.partition(b"\r\n\r\n")
    assert b"chunked" not in head
    assert b"Connection: close" in head
    assert body == b"one,two,three"


async def test_chunked_request_body_is_read() -> None:
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(
            port,
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
    assert _responses(raw)[0][2] == b"11"


async def test_many_small_chunks_and_a_trailer_are_read() -> None:
    chunks = b"".join(b"1\r\n%c\r\n" % (97 + i % 26) for i in range(20_000))
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(
            port,
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunks + b"0\r\nX-Checksum: 1\r\n\r\n",
        )
    assert _responses(raw)[0][2] == b"20000"


async def test_large_body_is_streamed_with_back_pressure() -> None:
    payload = b"x" * (8 * 1024 * 1024)
    async with (
        serving() as (_, port, _errors),
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/echo", data=io.BytesIO(payload)) as r,
    ):
        assert await r.text() == str(len(payload))


async def test_early_answer_to_an_upload_reaches_the_client() -> None:
    """The server answers before the body is in; the client still gets the answer."""
    async with serving() as (_, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = 4 * 1024 * 1024
        writer.write(b"POST /reject HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        sent = 0
        while sent < size:  # the server reads (and drops) it all: no reset
            writer.write(b"y" * 65536)
            sent += 65536
            await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in raw
    assert raw.endswith(b"too big")


async def test_handler_error_is_a_problem_500() -> None:
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(port, b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")
    ((status, headers, body),) = _responses(raw)
    assert status == 500
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert json.loads(body)["detail"] == "internal error"


async def test_websocket_upgrade_after_a_pipelined_request_is_handed_over() -> None:
    async with serving() as (_, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        first = await asyncio.wait_for(reader.readuntil(b"path=/first"), 5)
        upgraded = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        # a masked text frame "hi"
        mask = b"\x01\x02\x03\x04"
        writer.write(b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi")))
        frame = await asyncio.wait_for(reader.readexactly(9), 5)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert upgraded.startswith(b"HTTP/1.1 101 Switching Protocols")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in upgraded
    assert frame == b"\x81\x07echo:hi"


async def test_idle_keep_alive_connections_are_closed() -> None:
    async with serving(keepalive_s=0.3) as (_, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"path=/x"), 5)
        rest = await asyncio.wait_for(reader.read(), 5)  # b"" once the server closes
        writer.close()
    assert rest == b""


async def test_draining_closes_idle_connections_and_busy_ones_after_their_answer() -> None:
    async with serving() as (server, port, _errors):
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(idle_r.readuntil(b"path=/x"), 5)
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await wait_for(lambda: server.in_flight() == 1)
        server.start_draining()
        assert await asyncio.wait_for(idle_r.read(), 5) == b""
        busy = await asyncio.wait_for(busy_r.read(), 5)
        idle_w.close()
        busy_w.close()
    head, _, body = busy.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    assert body == b"path=/slow"


async def test_immediate_answers_keep_their_place_in_a_pipeline() -> None:
    async with serving() as (_, port, _errors):
        alone = await raw_exchange(port, b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n")
        queued = await raw_exchange(
            port,
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /now HTTP/1.0\r\n\r\n"
            b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n",
        )
    assert [b for _, _, b in _responses(alone)] == [b"now"]
    # the HTTP/1.0 one closes the connection: what follows it is not served
    assert [b for _, _, b in _responses(queued)] == [
        b"path=/slow",
        b"now (queued)",
        b"now (queued)",
    ]


async def test_upgrade_on_an_idle_kept_alive_connection_ends_its_task() -> None:
    """After a handover nothing of the old protocol is left waiting (no task leak)."""
    async with serving() as (server, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"path=/first"), 5)
        (proto,) = server.connections
        task = proto._task  # the connection's task, waiting for a request
        assert task is not None
        assert not task.done()
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        upgraded = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await asyncio.sleep(0.05)
        writer.close()
    assert upgraded.startswith(b"HTTP/1.1 101 ")
    assert task.done()
    assert not server.connections


async def test_a_client_that_does_not_read_its_answers_holds_back_the_next_ones() -> None:
    """Pipelined answers do not pile up in memory while the client reads nothing."""
    n = 200  # 50 MiB of answers
    async with serving() as (server, port, _errors):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)  # noqa: FBT003 - the socket API
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n" * n)
        await asyncio.sleep(0.5)
        (proto,) = server.connections
        assert proto.transport is not None
        assert proto.transport.get_write_buffer_size() < 8 * 1024 * 1024
        # once the client reads, every answer comes, in order
        got = 0
        for _ in range(n):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            got += len(await asyncio.wait_for(reader.readexactly(len(BIG)), 10))
        writer.close()
    assert got == n * len(BIG)


async def test_an_error_answering_from_the_parser_leaves_the_request_to_the_handler() -> None:
    async with serving() as (_, port, errors):
        raw = await raw_exchange(port, b"GET /probe-bug HTTP/1.1\r\nHost: a\r\n\r\n")
    # served as a request instead: the handler answers it
    assert _responses(raw)[0][:1] == (200,)
    assert errors == []  # not counted against the client as a malformed request


async def test_shutdown_cancels_the_requests_still_being_served() -> None:
    CANCELLED.clear()
    async with serving() as (server, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /forever HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await wait_for(lambda: server.in_flight() == 1)
        await asyncio.wait_for(server.shutdown(1.0), 5)
        assert CANCELLED == ["/forever"]
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


async def test_a_pipelined_flood_is_parsed_only_as_it_is_served() -> None:
    """256 KiB of tiny pipelined requests behind a slow one: the bytes wait unparsed
    (no thousands of queued requests in memory), and every request is answered in order."""
    tiny = b"GET /t HTTP/1.1\r\nHost: a\r\n\r\n"
    n = 262_144 // len(tiny)
    async with serving() as (server, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n" + tiny * n)
        await writer.drain()
        await asyncio.sleep(0.15)  # /slow is being served; everything else has been read
        (proto,) = server.connections
        queued = len(proto._pending)  # the memory this test is about
        assert 1 <= queued < 128, queued
        answers = 0
        first = await asyncio.wait_for(reader.readuntil(b"path=/slow"), 5)
        while answers < n:
            await asyncio.wait_for(reader.readuntil(b"path=/t"), 5)
            answers += 1
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert answers == n


async def test_a_flood_behind_an_upload_is_cut_at_the_queue_bound() -> None:
    """Requests sent in one read with the end of a body: 128 are queued and answered (the
    128th, an upload itself, with its body), the last with Connection: close. The rest
    are dropped unread while the client goes on sending, and the client gets every
    answer, then the end of the connection (no reset that could lose answers)."""
    tiny = b"GET /t HTTP/1.1\r\nHost: a\r\n\r\n"
    upload = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    flood = b"12345" + tiny * 127 + upload + tiny * 200_000  # 3.8 MB
    loop = asyncio.get_running_loop()
    async with serving() as (server, port, _errors):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)  # noqa: FBT003 - the socket API
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        )
        await asyncio.sleep(0.05)  # the upload is being served, its body in progress
        sending = loop.create_task(loop.sock_sendall(sock, flood))
        raw = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5):
            raw += chunk  # read slowly: the client is still sending meanwhile
            await asyncio.sleep(0.001)
        await asyncio.wait_for(sending, 5)  # all of it was taken (and dropped)
        sock.close()
        assert await wait_for(lambda: not server.connections)
    answers = _responses(raw)
    assert len(answers) == 1 + 128
    assert answers[0][2] == b"5"
    assert [b for _, _, b in answers[1:-1]] == [b"path=/t"] * 127
    assert answers[-1][2] == b"3"
    assert answers[-1][1]["connection"] == "close"


async def test_one_answer_from_the_parser_a_read_the_rest_queue() -> None:
    """Probes answered from the parser are not queued: one a read, the rest go through
    the handler in order, so a read full of them cannot pile answers up at once."""
    async with serving() as (_, port, _errors):
        raw = await raw_exchange(port, b"GET /now HTTP/1.1\r\nHost: a\r\n\r\n" * 20)
    assert [b for _, _, b in _responses(raw)] == [b"now"] + [b"now (queued)"] * 19


async def test_a_head_behind_a_request_being_served_still_times_out() -> None:
    async with serving(client_timeout_s=0.2) as (_, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /partial HTTP/1.1\r\nHost: a\r\nX-Y: 1"
        )
        raw = await asyncio.wait_for(reader.read(), 3)  # the gateway closes after its 408
        writer.close()
    assert [status for status, _, _ in _responses(raw)] == [200, 408]


async def test_bytes_after_an_upgrade_wait_unread_while_the_request_before_it_is_served() -> None:
    """An upgrade queued behind a request: reading stays paused until the handover, so
    what the client sends meanwhile does not pile up in memory."""
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with serving() as (server, port, _errors):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /forever HTTP/1.1\r\nHost: a\r\n\r\n" + upgrade
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # /x answered, /forever being served, the upgrade waits
        for _ in range(20):
            writer.write(b"\x00" * 1_000_000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 1)
        (proto,) = server.connections
        held = len(proto._handoff or b"")  # what the handover will carry
        writer.close()
    assert held < 1_000_000, held


async def test_a_closing_connection_gets_no_408_for_the_head_behind_its_last_answer() -> None:
    """Draining while a request is served, a head half sent behind it: the answer closes
    the connection, and nothing follows it, however long the client takes to read it."""
    loop = asyncio.get_running_loop()
    async with serving(client_timeout_s=0.2) as (server, port, errors):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)  # noqa: FBT003 - the socket API
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock, b"GET /slow-big HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nX: 1"
        )
        await asyncio.sleep(0.05)
        server.start_draining()
        await asyncio.sleep(1.0)  # not reading: the answer waits in the send buffer
        raw = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5):
            raw += chunk
        sock.close()
    answers = _responses(raw)
    assert [status for status, _, _ in answers] == [200]
    assert answers[0][1]["connection"] == "close"
    assert errors == []


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def test_an_idle_kept_alive_connection_holds_no_parser_nor_its_last_request() -> None:
    """A connection that never sent holds no parser; one gone idle drops it (and the
    request it served) at the next housekeeping tick, and is served again as before."""
    async with serving() as (server, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await wait_for(lambda: len(server.connections) == 1)
        (proto,) = server.connections
        assert proto._parser is None
        gc.collect()
        requests = _alive(Request)  # (left over by other tests)
        writer.write(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"path=/first"), 5)
        assert proto._parser is not None
        assert await wait_for(lambda: proto._parser is None, timeout=3)
        gc.collect()
        assert _alive(Request) == requests  # the task waiting for the next one holds none
        writer.write(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"path=/second"), 5)).startswith(
            b"HTTP/1.1 200 "
        )
        writer.close()


async def test_a_half_sent_head_keeps_its_parser_over_a_housekeeping_tick() -> None:
    async with serving() as (server, port, _errors):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow-head HTTP/1.1\r\n")
        await wait_for(lambda: len(server.connections) == 1)
        await asyncio.sleep(1.2)  # at least one tick
        writer.write(b"Host: a\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"path=/slow-head"), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_closed_connection_is_freed_without_the_cycle_collector() -> None:
    gc.collect()
    gc.disable()
    try:
        async with serving() as (server, port, _errors):
            before = _alive(HttpProtocol)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"path=/x"), 5)
            writer.close()
            assert await wait_for(lambda: not server.connections)
            await asyncio.sleep(0.05)
            after = _alive(HttpProtocol)
    finally:
        gc.enable()
    assert after == before


async def test_an_answer_from_the_parser_does_not_wait_for_the_rounds_other_work() -> None:
    """A probe parsed in the same round as requests whose handlers are busy is answered
    in that round, not after their work (the kubelet's probe of a saturated proxy)."""
    async with serving() as (_server, port, _):
        loop = asyncio.get_running_loop()
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        arrived: dict[str, float] = {}
        blocked = threading.Event()

        def client() -> None:
            blocked.wait(5)
            for s in socks[:3]:
                s.sendall(b"GET /busy HTTP/1.1\r\nHost: x\r\n\r\n")
            socks[3].sendall(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
            for name, s in (("probe", socks[3]), ("busy", socks[0])):
                s.settimeout(5)
                s.recv(4096)
                arrived[name] = time.monotonic()

        def hold_the_loop() -> None:  # all four requests then arrive in one round
            blocked.set()
            time.sleep(0.2)
            arrived["unblocked"] = time.monotonic()

        await asyncio.sleep(0.05)  # the connections are accepted
        thread = threading.Thread(target=client)
        thread.start()
        loop.call_soon(hold_the_loop)
        while thread.is_alive():
            await asyncio.sleep(0.01)
        for s in socks:
            s.close()
        # sent before the first busy handler's 0.1 s (queued, after all three: 0.3 s)
        assert arrived["probe"] - arrived["unblocked"] < 0.1
        assert arrived["busy"] - arrived["unblocked"] >= 0.1


async def test_heap_memory_is_given_back_after_a_burst_of_closed_connections() -> None:
    """1,200 idle connections, then all closed: the next housekeeping tick gives the
    freed heap back to the OS once (malloc_trim, where the C library has it)."""
    async with serving() as (server, port, _errors):
        released: list[int] = []

        def release() -> bool:  # counts, trims nothing
            released.append(1)
            return True

        server.memory._release = release
        loop = asyncio.get_running_loop()
        socks: list[socket.socket] = []
        try:
            for _ in range(1200):
                s = socket.socket()
                s.setblocking(False)  # noqa: FBT003
                socks.append(s)
                await loop.sock_connect(s, ("127.0.0.1", port))
            assert await wait_for(lambda: len(server.connections) == 1200, timeout=10)
            await asyncio.sleep(1.1)  # a tick sees the peak
            assert released == []
        finally:
            for s in socks:
                s.close()
        assert await wait_for(lambda: not server.connections, timeout=10)
        assert await wait_for(lambda: server.memory.releases == 1, timeout=3)
        await asyncio.sleep(1.1)
        assert released == [1]  # once for the burst, not on every tick


async def test_the_in_flight_count_returns_to_zero_whatever_the_handler_did() -> None:
    """The count that lets a lone request's answer leave at once (the batcher's) follows
    every request out: answered, failed, or cancelled by shutdown."""
    before = SERVING.active
    async with serving() as (server, port, _errors):
        raw = await raw_exchange(
            port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /boom HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        assert [r[0] for r in _responses(raw)] == [200, 500]
        assert SERVING.active == before
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /forever HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await wait_for(lambda: SERVING.active == before + 1)
        await asyncio.wait_for(server.shutdown(1.0), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert SERVING.active == before


async def test_finished_runs_once_the_answer_is_written() -> None:
    """The handler's bookkeeping (``finished``: the gateway's metrics and access log)
    runs after its answer is written, so the client does not wait for it; a fault in it
    costs neither that answer nor the connection's next one."""
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.settimeout(0.0)  # non-blocking
    seen: list[tuple[str, int, bytes]] = []

    def finished(req: Request, resp: Any) -> None:
        try:  # what the client has been sent already, by the time this runs
            sent = client.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            sent = b""
        seen.append((req.path, resp.status, sent))
        if req.path == "/fault":
            msg = "a fault in the bookkeeping"
            raise RuntimeError(msg)

    async with serving() as (server, port, _errors):
        server.finished = finished
        try:
            await loop.sock_connect(client, ("127.0.0.1", port))
            await loop.sock_sendall(client, b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await wait_for(lambda: len(seen) == 1)
            await loop.sock_recv(client, 65536)  # the first answer, taken
            await loop.sock_sendall(client, b"GET /fault HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await wait_for(lambda: len(seen) == 2)
            await loop.sock_sendall(
                client, b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            raw = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 65536), 5):
                raw += chunk
        finally:
            client.close()
    assert [(path, status) for path, status, _ in seen] == [
        ("/one", 200),
        ("/fault", 200),
        ("/three", 200),
    ]
    for path, _, sent in seen:
        assert sent.startswith(b"HTTP/1.1 200 OK\r\n"), path
        assert sent.endswith(b"path=" + path.encode()), path
    assert [body for _, _, body in _responses(raw)] == [b"path=/fault", b"path=/three"]
