"""Slow clients against a small upstream pool, over real sockets (SPEC section 9).

A client that trickles its body, or stops taking its answer, must not hold the pool an
upstream shares with everyone else; a request waiting for a pool connection gets its 504
within the upstream's ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import Gateway
from tests.gw import base_config, running_gateway, serve, url, wait_for

KIB = 1024
BUFFER = 256 * KIB  # request.buffer_body_bytes in these tests (the old read-ahead: 64 KiB)


@dataclass
class Upstream:
    """What the test upstream saw: bodies read whole, bodies cut off, requests at once."""

    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    cut: list[float] = field(default_factory=list)  # when a body read failed (loop time)
    active: int = 0
    most: int = 0
    sent: int = 0  # bytes of /big written


def _app(up: Upstream) -> web.Application:
    async def upload(request: web.Request) -> web.Response:
        up.active += 1
        up.most = max(up.most, up.active)
        try:
            body = await request.read()
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.CancelledError):
            up.cut.append(asyncio.get_running_loop().time())
            raise
        finally:
            up.active -= 1
        up.bodies.append(body)
        return web.Response(text=str(len(body)))

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.Response(text="slow")

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = int(request.query["kb"]) << 10
        await resp.prepare(request)
        part = b"b" * (64 * KIB)
        left = resp.content_length
        while left > 0:
            await resp.write(part[:left])
            up.sent += min(left, len(part))
            left -= len(part)
        return resp

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/upload", upload)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_get("/{tail:.*}", ok)
    return app


@asynccontextmanager
async def _setup(
    *, request: dict[str, Any] | None = None, **upstream: Any
) -> AsyncIterator[tuple[Gateway, Upstream]]:
    up = Upstream()
    async with serve(_app(up)) as up_url:
        up.url = up_url
        cfg = base_config(
            up_url,
            upstreams={"api": {"url": up_url, "retries": {"attempts": 1}, **upstream}},
            request={"buffer_body_bytes": BUFFER, "client_timeout_s": 5, **(request or {})},
            abuse={"enabled": False},
        )
        async with running_gateway(cfg) as gw:
            yield gw, up


async def _upload(
    gw: Gateway, declared: int, sent: int, *, chunked: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST that announces ``declared`` bytes (chunked: in one chunk) and sends ``sent``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
    framing = (
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % declared
        if chunked
        else b"Content-Length: %d\r\n\r\n" % declared
    )
    writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\n" + framing + b"u" * sent)
    await writer.drain()
    return reader, writer


async def _status(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    return int(head[9:12]), head


async def _get(gw: Gateway, path: str = "/ok", timeout: float = 10) -> tuple[int, float]:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.get(url(gw, path), timeout=aiohttp.ClientTimeout(total=timeout)) as r,
    ):
        await r.read()
        return r.status, time.monotonic() - t0


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize(
    ("buffer", "declared", "sent"),
    [
        (1 << 20, 1 << 20, 200 * KIB),  # the defaults: 200 KiB of a declared 1 MiB
        (BUFFER, BUFFER, BUFFER - 1),  # the largest body read whole, one byte short
        (BUFFER, 16 * KIB, 10 * KIB),  # a small one
        (BUFFER, 4 * BUFFER, BUFFER - 1),  # a large one stalled before the buffer is full
    ],
    ids=["issue", "buffer-1", "small", "large-short-of-buffer"],
)
async def test_stalled_uploads_within_the_buffer_hold_no_upstream_connection(
    buffer: int, declared: int, sent: int, *, chunked: bool
) -> None:
    limits = {"buffer_body_bytes": buffer}
    async with _setup(max_connections=2, request=limits) as (gw, up):
        stalled = [await _upload(gw, declared, sent, chunked=chunked) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert up.active == 0  # nothing of them reached the upstream
        for _ in range(3):
            status, took = await _get(gw)
            assert status == 200
            assert took < 1.0  # not behind the stalled uploads (5 s)
        t0 = time.monotonic()
        for reader, writer in stalled:
            status, _ = await _status(reader, 6)
            assert status == 408  # client_timeout_s covers a body within the buffer
            writer.close()
        assert time.monotonic() - t0 < 5.5
        assert up.bodies == []
        assert up.cut == []


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_a_large_body_that_stalls_gets_408_after_body_idle_s_and_frees_its_connection(
    *, chunked: bool
) -> None:
    async with _setup(max_connections=1, request={"body_idle_s": 0.5}) as (gw, up):
        loop = asyncio.get_running_loop()
        reader, writer = await _upload(gw, 4 * BUFFER, BUFFER + 10 * KIB, chunked=chunked)
        assert await wait_for(lambda: up.active == 1, 2)  # streamed past the buffer
        t0 = loop.time()
        status, head = await _status(reader, 3)
        answered = loop.time()
        assert status == 408
        assert b"Connection: close" in head
        assert 0.3 < answered - t0 < 1.5
        # its upstream connection was closed, not handed to the next request
        assert await wait_for(lambda: len(up.cut) == 1, 1)
        assert up.cut[0] - answered < 0.5
        status, took = await _get(gw)
        assert status == 200
        assert took < 0.5
        writer.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize(
    "size",
    [0, 1, 200, BUFFER - 1, BUFFER, BUFFER + 1, 3 * BUFFER + 7],
)
async def test_bodies_around_the_buffer_size_reach_the_upstream_whole(
    size: int, *, chunked: bool
) -> None:
    body = bytes(i % 251 for i in range(size))
    async with _setup() as (gw, up), aiohttp.ClientSession() as s:

        async def parts() -> AsyncIterator[bytes]:
            for i in range(0, size, 10_000):
                yield body[i : i + 10_000]

        data: Any = parts() if chunked else body
        async with s.post(url(gw, "/upload"), data=data) as r:
            assert r.status == 200
            assert await r.text() == str(size)
        assert up.bodies == [body]


async def test_bodies_held_past_max_buffered_bytes_get_503_with_retry_after() -> None:
    limits = {"max_buffered_bytes": 2 * BUFFER}
    async with _setup(request=limits) as (gw, up):
        held = [await _upload(gw, BUFFER, BUFFER - 100) for _ in range(2)]
        await asyncio.sleep(0.3)
        # a third announced body does not fit: refused before it is read
        reader, writer = await _upload(gw, 1000, 0)
        status, head = await _status(reader, 2)
        assert status == 503
        assert b"Retry-After: 1\r\n" in head
        assert b"application/problem+json" in head
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        problem = json.loads(await reader.readexactly(length))
        assert problem["type"].endswith("/body-buffers-full")
        writer.close()
        # a chunked one is counted as it comes
        reader, writer = await _upload(gw, 50 * KIB, 50 * KIB, chunked=True)
        status, _ = await _status(reader, 2)
        assert status == 503
        writer.close()
        # bodyless requests are not concerned
        assert (await _get(gw))[0] == 200
        # the bytes of clients that leave are given back
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.post(url(gw, "/upload"), data=b"p" * (BUFFER - 1)) as r:
                    assert r.status == 200
        assert len(up.bodies) == 3


async def test_waiting_for_a_pool_connection_counts_against_timeout_s() -> None:
    async with _setup(max_connections=2, timeout_s=1) as (gw, _):
        results = await asyncio.gather(*(_get(gw, "/slow?s=5") for _ in range(6)))
        statuses = [s for s, _ in results]
        took = sorted(t for _, t in results)
        assert statuses == [504] * 6
        assert took[-1] < 1.6, took  # all within timeout_s, not 1, 1, 2, 2, 3, 3 s
        status, elapsed = await _get(gw)  # the pool is whole again
        assert status == 200
        assert elapsed < 0.5


async def test_a_body_still_trickling_at_timeout_s_is_a_408_and_no_upstream_failure() -> None:
    breaker = {"consecutive_failures": 2}
    async with _setup(timeout_s=1, circuit_breaker=breaker, request={"body_idle_s": 5}) as (
        gw,
        up,
    ):

        async def trickle() -> int:
            reader, writer = await _upload(gw, 4 * BUFFER, BUFFER + 1)
            try:
                while True:
                    try:
                        status, _ = await _status(reader, 0.3)
                    except TimeoutError:
                        writer.write(b"t")  # a byte now and then: never idle
                        continue
                    return status
            finally:
                writer.close()

        statuses = await asyncio.gather(*(trickle() for _ in range(3)))
        assert statuses == [408, 408, 408]
        assert len(up.cut) == 3
        # the client's slowness did not open the breaker of the upstream
        assert (await _get(gw))[0] == 200


async def test_a_client_that_reads_nothing_of_a_large_answer_is_cut_off_after_body_idle_s() -> None:
    async with _setup(max_connections=1, timeout_s=30, request={"body_idle_s": 1}) as (gw, up):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(b"GET /big?kb=65536 HTTP/1.1\r\nHost: gw\r\n\r\n")
        await writer.drain()
        status, _ = await _status(reader, 2)
        assert status == 200
        t0 = time.monotonic()
        # no more read: the gateway stops taking from the upstream (its buffers are
        # bounded), then closes the connection once nothing was taken for body_idle_s
        await asyncio.sleep(2.5)
        assert up.sent < 32 << 20  # far from all 64 MiB: kernel buffers and the gateway's
        data = b""
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):  # noqa: PT012
            while True:  # what was sent before the cut, then the end
                chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
                if not chunk:
                    raise asyncio.IncompleteReadError(data, None)
                data += chunk
        assert time.monotonic() - t0 < 4
        writer.close()
        # its upstream connection is free for the next request
        status, took = await _get(gw)
        assert status == 200
        assert took < 0.5


async def test_a_slow_reader_holds_the_upstream_connection_at_most_timeout_s() -> None:
    async with _setup(max_connections=1, timeout_s=2, request={"body_idle_s": 5}) as (gw, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port, limit=64 * KIB)
        writer.write(b"GET /big?kb=65536 HTTP/1.1\r\nHost: gw\r\n\r\n")
        await writer.drain()

        async def read_slowly() -> int:
            got = 0
            while chunk := await reader.read(16 * KIB):
                got += len(chunk)
                await asyncio.sleep(0.2)
            return got

        slow = asyncio.create_task(read_slowly())
        await asyncio.sleep(2.6)
        status, took = await _get(gw)  # the slot came back at timeout_s
        assert status == 200
        assert took < 0.5
        slow.cancel()
        writer.close()


async def test_a_get_with_a_stalled_body_holds_no_upstream_connection() -> None:
    # a GET with a body is read like any other (a small one whole, before the pool)
    async with _setup(max_connections=1) as (gw, up):
        _, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.2)
        status, took = await _get(gw)
        assert status == 200
        assert took < 0.5
        writer.close()
        assert up.active == 0
