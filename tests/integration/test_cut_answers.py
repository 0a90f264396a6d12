"""Answers that did not reach the client whole are still recorded: an upstream that
drops mid-answer, a client that leaves before its answer or in the middle of it. Each
has its access-log line and its count, with the status the client saw (or 499, as NGINX
logs a client gone before the answer) and the bytes that were written."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

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


async def _exchange(port: int, path: str, *, read: int, wait_s: float) -> bytes:
    """Send a GET, read up to ``read`` bytes within ``wait_s``, then reset the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
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


async def test_an_upstream_dropping_mid_answer_is_recorded_with_what_was_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with _gateway() as gw:
        before = _count(gw, "200")
        got = await _exchange(gw.proxy_port or 0, "/drop", read=200_000, wait_s=3)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        assert await wait_for(lambda: _count(gw, "200") == before + 1, timeout=3)
        gw.runtime.access_log.flush()
    lines = _access_lines(capsys.readouterr().out, "/drop")
    assert len(lines) == 1, lines
    assert lines[0]["status"] == 200
    assert lines[0]["bytes"] == 1000  # what reached the client, not the announced length


async def test_a_client_gone_before_its_answer_is_recorded_as_499(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with _gateway() as gw:
        got = await _exchange(gw.proxy_port or 0, "/slow", read=1, wait_s=0.2)
        assert got == b""
        assert await wait_for(lambda: _count(gw, "499") == 1, timeout=3)
        assert _count(gw, "200") == 0  # the upstream's answer never went out
        gw.runtime.access_log.flush()
    lines = _access_lines(capsys.readouterr().out, "/slow")
    assert len(lines) == 1, lines
    assert lines[0]["status"] == 499
    assert lines[0]["bytes"] == 0


async def test_a_client_gone_mid_answer_is_recorded_with_the_bytes_written(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with _gateway() as gw:
        got = await _exchange(gw.proxy_port or 0, "/big", read=100, wait_s=3)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        assert await wait_for(lambda: _count(gw, "200") == 1, timeout=5)
        gw.runtime.access_log.flush()
    lines = _access_lines(capsys.readouterr().out, "/big")
    assert len(lines) == 1, lines
    assert lines[0]["status"] == 200  # the status the client was sent
    assert lines[0]["bytes"] < BIG  # not the upstream's whole length
