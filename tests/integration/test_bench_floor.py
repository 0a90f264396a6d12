"""bench/floor_server.py, run.py's gw-floor: the gateway's server and pool forwarding an
answer whole, with one framing of its own (a client like wrk refuses two lengths)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BODY = b"0123456789" * 20


async def _upstream(port: int, ready: asyncio.Event, stop: asyncio.Event) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Connection: keep-alive\r\nContent-Length: 200\r\n\r\n" + BODY
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    ready.set()
    async with server:
        await stop.wait()


@contextlib.contextmanager
def _floor(port: int, upstream: int) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, str(ROOT / "bench" / "floor_server.py"), "--port", str(port)]
    argv += ["--upstream", f"http://127.0.0.1:{upstream}"]
    proc = subprocess.Popen(argv)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _get(port: int, deadline: float) -> bytes:
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    answers = b""
    for _ in range(2):  # twice on one connection: kept alive
        writer.write(b"GET /api/items?id=42 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        answers += head + await reader.readexactly(200)
    writer.close()
    return answers


@pytest.mark.timeout(60)
async def test_the_floor_forwards_with_one_framing() -> None:
    up, port = free_port(), free_port()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_upstream(up, ready, stop))
    await ready.wait()
    try:
        with _floor(port, up) as proc:
            answers = await _get(port, time.monotonic() + 20)
            assert proc.poll() is None
    finally:
        stop.set()
        await task
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert answers.count(BODY) == 2
    assert answers.lower().count(b"content-length: 200") == 2  # one a answer
    assert b"text/plain" in answers


def test_the_floor_runs_the_gateway_package_it_is_given(tmp_path: Path) -> None:
    """bench/run.py hands the floor the build it measures (a compiled copy): the floor
    must run that copy, not this checkout's package (which the bench's helpers put first
    on sys.path for in-process rigs), or the floor is measured in another build than the
    pipeline beside it."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    bench_run = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_run", bench_run)  # dataclasses look their module up by name
    spec.loader.exec_module(bench_run)
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "gateway", copy / "gateway", ignore=shutil.ignore_patterns("*.pyc"))
    env = bench_run.gateway_env(copy, None)
    argv = [sys.executable, "-P", str(ROOT / "bench" / "floor_server.py"), "--which"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert Path(out.stdout.strip()).is_relative_to(copy / "gateway"), out.stdout
