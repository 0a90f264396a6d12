"""Answers that did not reach the client whole are still recorded: an upstream that
drops mid-answer, a client that leaves before its answer or in the middle of it. Each
has its access-log line and its count, with the status the client saw (or 499, as NGINX
logs a client gone before the answer) and the bytes that were written. Each on both of
the proxy port's servers: its own, and aiohttp's, which serves a connection once a
request on it asks for an upgrade (any client can ask, with any token)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway import logs
from gateway.app import Gateway
from tests.gw import base_config, running_gateway, serve, wait_for

BIG = 64 * 65536


async def _upstream(request: web.Request) -> web.StreamResponse:
    """/drop: half an answer, then the connection dropped; /slow: an answer after 0.6 s;
    /big: 4 MiB streamed; else 200 at once."""
    if request.path == "/drop":
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return resp
    if request.path == "/slow":
        await asyncio.sleep(0.6)
        return web.Response(text="late")
    if request.path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws
    if request.path == "/big":
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(BIG // 65536):
            await resp.write(b"x" * 65536)
        return resp
    return web.Response(text="ok")


@contextlib.asynccontextmanager
async def _gateway() -> AsyncIterator[Gateway]:
    async with serve(_upstream) as u:
        cfg = base_config(u, access_log={"sample_ratio": 1.0}, abuse={"enabled": False})
        async with running_gateway(cfg) as gw:
            yield gw


def _count(gw: Gateway, code: str) -> float:
    return sum(
        sample.value
        for family in gw.runtime.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels["code"] == code
    )


def _access_lines(out: str, path: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(x) for x in out.splitlines() if '"event":"access"' in x]
    return [x for x in lines if x["path"] == path]


# the proxy port's own server; aiohttp's, to which an upgrade hands the connection over
SERVERS = pytest.mark.parametrize(
    "extra", ["", "Connection: Upgrade\r\nUpgrade: foo\r\n"], ids=["own", "upgrade-path"]
)


async def _exchange(port: int, path: str, *, read: int, wait_s: float, extra: str = "") -> bytes:
    """Send a GET, read up to ``read`` bytes within ``wait_s``, then reset the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode())
    got = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait_s):
            while len(got) < read:
                chunk = await reader.read(read - len(got))
                if not chunk:
                    break
                got += chunk
    writer.transport.abort()
    return got


@SERVERS
async def test_an_upstream_dropping_mid_answer_is_recorded_with_what_was_sent(
    extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with _gateway() as gw:
        before = _count(gw, "200")
        got = await _exchange(gw.proxy_port or 0, "/drop", read=200_000, wait_s=3, extra=extra)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        assert await wait_for(lambda: _count(gw, "200") == before + 1, timeout=3)
        gw.runtime.access_log.flush()
    lines = _access_lines(capsys.readouterr().out, "/drop")
    assert len(lines) == 1, lines
    assert lines[0]["status"] == 200
    assert lines[0]["bytes"] == 1000  # what reached the client, not the announced length


@SERVERS
async def test_a_client_gone_before_its_answer_is_recorded_as_499(
    extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with _gateway() as gw:
        got = await _exchange(gw.proxy_port or 0, "/slow", read=1, wait_s=0.2, extra=extra)
        assert got == b""
        assert await wait_for(lambda: _count(gw, "499") == 1, timeout=3)
        assert _count(gw, "200") == 0  # the upstream's answer never went out
        gw.runtime.access_log.flush()
    lines = _access_lines(capsys.readouterr().out, "/slow")
    assert len(lines) == 1, lines
    assert lines[0]["status"] == 499
    assert lines[0]["bytes"] == 0


@SERVERS
async def test_a_client_gone_mid_answer_is_recorded_with_the_bytes_written(
    extra: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with _gateway() as gw:
        got = await _exchange(gw.proxy_port or 0, "/big", read=100, wait_s=3, extra=extra)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        assert await wait_for(lambda: _count(gw, "200") == 1, timeout=5)
        gw.runtime.access_log.flush()
    lines = _access_lines(capsys.readouterr().out, "/big")
    assert len(lines) == 1, lines
    assert lines[0]["status"] == 200  # the status the client was sent
    assert lines[0]["bytes"] < BIG  # not the upstream's whole length


async def test_a_field_value_outside_latin1_on_the_upgrade_path_goes_upstream_as_sent() -> None:
    """aiohttp decodes field values as UTF-8: the bytes sent reach the upstream as they
    came, as on the proxy port's own server, never a 500 for encoding them anew."""
    seen: list[bytes] = []

    async def upstream(request: web.Request) -> web.StreamResponse:
        if request.path == "/utf8":  # (not the health checks)
            seen.append(request.headers["X-Foo"].encode("utf-8", "surrogateescape"))
        return web.Response(text="ok")

    async with serve(upstream) as u:
        async with running_gateway(base_config(u, abuse={"enabled": False})) as gw:
            for value in (b"\xe2\x82\xac", b"caf\xc3\xa9", b"\xff\xfe"):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port or 0)
                writer.write(
                    b"GET /utf8 HTTP/1.1\r\nHost: a\r\nX-Foo: " + value
                    + b"\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n"
                )  # fmt: skip
                status = await reader.readline()
                writer.close()
                assert status.startswith(b"HTTP/1.1 200 "), status
    assert seen == [b"\xe2\x82\xac", b"caf\xc3\xa9", b"\xff\xfe"]


async def test_a_websocket_closed_by_its_client_is_recorded_as_101(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its connection is gone once it is over, but its answer went out: 101, not 499."""
    async with _gateway() as gw, aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{gw.proxy_port}/ws") as ws:
            await ws.send_str("hi")
            assert (await ws.receive()).data == "hi"
        assert await wait_for(lambda: _count(gw, "101") == 1, timeout=3)
        assert _count(gw, "499") == 0
        gw.runtime.access_log.flush()
    assert [x["status"] for x in _access_lines(capsys.readouterr().out, "/ws")] == [101]


@SERVERS
async def test_a_fault_in_the_record_costs_neither_the_answer_nor_the_connection(
    extra: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The record runs after the answer (or, on aiohttp's server, just before it is
    written): a bug there is logged, and the client still gets its answer."""
    if logs.__file__.endswith(".so"):
        pytest.skip("a compiled runtime takes only an AccessLog")

    class Broken(logs.AccessLog):
        def request(self, **_fields: Any) -> None:
            raise RuntimeError("a fault in the record")

    async with _gateway() as gw:
        monkeypatch.setattr(gw.runtime, "access_log", Broken(io.BytesIO()))
        got = await _exchange(gw.proxy_port or 0, "/ok", read=2_000, wait_s=1, extra=extra)
    assert got.startswith(b"HTTP/1.1 200 "), got[:100]
    assert b"\r\n\r\nok" in got
    assert "error recording a request" in caplog.text
