"""The `gateway serve` process: start, SIGHUP reload, SIGTERM drain under load."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import YOUNG_GC_THRESHOLD, Gateway
from gateway.config import load_file
from tests.conftest import free_port
from tests.files import make_not_a_config, unblock_fifos
from tests.gw import serve, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def slow_upstream() -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0.05")))
        return web.Response(text="ok")

    async with serve(handle) as url_:
        yield url_


def _config(tmp: Path, upstream: str, **extra: Any) -> tuple[Path, int, int]:
    port, admin = free_port(), free_port()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "upstreams": {"api": {"url": upstream, "health": {"interval_s": 0.2}}},
        "routes": [{"name": "api", "path_prefix": "/", "upstream": "api"}],
        "drain": {"delay_s": 1.0, "timeout_s": 5},
        "reload": {"interval_s": 3600},
        **extra,
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port, admin


async def _wait_ready(port: int, timeout: float = 10) -> float:
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t0 < timeout:
            try:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    msg = "gateway did not become ready"
    raise AssertionError(msg)


def _spawn(path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": "t"}
    # logs go to a file: a pipe nobody reads would fill up and block the gateway
    with (path.parent / "stdout.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _events(out: bytes) -> list[dict[str, Any]]:
    lines = []
    for line in out.decode().splitlines():
        if line.strip():
            lines.append(json.loads(line))  # every stdout line is one JSON object
    return lines


async def test_sigterm_under_load_drops_nothing_and_exits_0(
    tmp_path: Path, slow_upstream: str
) -> None:
    path, port, _ = _config(tmp_path, slow_upstream)
    proc = _spawn(path)
    try:
        await _wait_ready(port)
        results: list[int | str] = []
        stop = asyncio.Event()

        async def client() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/work?s=0.05") as r:
                            await r.read()
                            results.append(r.status)
                    except aiohttp.ClientConnectorError:
                        # refused: the listener is closed, the request was never accepted
                        await asyncio.sleep(0.01)
                    except aiohttp.ClientError as exc:
                        results.append(type(exc).__name__)

        tasks = [asyncio.create_task(client()) for _ in range(50)]
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        unready_after = None
        async with aiohttp.ClientSession() as s:
            while time.monotonic() - t0 < 1.0:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 503:
                        unready_after = time.monotonic() - t0
                        break
                await asyncio.sleep(0.02)
        assert unready_after is not None
        assert unready_after < 1.0
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*tasks)
        rc = await asyncio.to_thread(proc.wait, 15)
        assert rc == 0
        failed = [r for r in results if r != 200]
        assert len(results) > 200
        assert failed == [], f"{len(failed)} failed of {len(results)}: {failed[:5]}"
        out = (path.parent / "stdout.log").read_bytes()
        events = _events(out)
        names = [e["event"] for e in events]
        assert "config_summary" in names
        summary = events[names.index("config_summary")]
        assert set(summary) >= {
            "listeners",
            "routes",
            "upstreams",
            "policies",
            "backend",
            "warnings",
        }
        assert summary["listeners"]["proxy"].endswith(f":{port}")
        access = [e for e in events if e["event"] == "access"]
        assert len(access) >= len(results)  # every answered request has its line
        assert set(access[0]) >= {
            "request_id",
            "client_ip",
            "method",
            "path",
            "route",
            "status",
            "duration_ms",
            "bytes",
            "upstream",
            "ts",
        }
        assert names.index("drain_started") < names.index("drain_finished")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sighup_reloads_and_cold_start_is_fast(tmp_path: Path, slow_upstream: str) -> None:
    path, port, admin = _config(tmp_path, slow_upstream)
    proc = _spawn(path)
    try:
        took = await _wait_ready(port)
        assert took < 5
        cfg = yaml.safe_load(path.read_text())
        cfg["routes"][0]["path_prefix"] = "/only/"
        path.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(f"http://127.0.0.1:{port}/x") as r:
                    if r.status == 404:
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("SIGHUP did not reload")
            async with s.get(f"http://127.0.0.1:{admin}/metrics") as r:
                text = await r.text()
        assert 'gateway_config_reloads_total{result="success"} 1.0' in text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_with_invalid_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes: [{name: a, upstream: nope}]\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 2
    assert b"routes[0].upstream" in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "dev-urandom", "directory"])
def test_serve_with_a_path_that_is_not_a_file_exits_2(tmp_path: Path, kind: str) -> None:
    path = make_not_a_config(kind, tmp_path)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            capture_output=True,
            timeout=20,
            check=False,
        )
    finally:
        unblock_fifos(tmp_path)
    assert r.returncode == 2
    assert b"is not a regular file" in r.stderr
    assert b"Traceback" not in r.stderr


async def _reloads(admin: int, result: str) -> float:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{admin}/metrics") as r,
    ):
        text = await r.text()
    prefix = f'gateway_config_reloads_total{{result="{result}"}} '
    line = next((ln for ln in text.splitlines() if ln.startswith(prefix)), prefix + "0")
    return float(line[len(prefix) :])


async def test_a_config_swapped_for_a_fifo_never_wedges_reload_or_sigterm(
    tmp_path: Path, slow_upstream: str
) -> None:
    """The config path swapped for a symlink to a FIFO: a failed reload, counted and
    logged; the next good file still applies; SIGTERM still ends the process (exit 0)."""
    real, port, admin = _config(tmp_path, slow_upstream, reload={"interval_s": 0.2})
    path = tmp_path / "link.yaml"
    path.symlink_to(real)
    proc = _spawn(path)
    try:
        await _wait_ready(port)
        fifo = make_not_a_config("fifo", tmp_path)
        swap = tmp_path / "swap.yaml"
        swap.symlink_to(fifo)
        swap.replace(path)
        for _ in range(100):
            if await _reloads(admin, "failure") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the swap to a FIFO was not reported as a failed reload")
        cfg = yaml.safe_load(real.read_text())
        cfg["routes"][0]["path_prefix"] = "/only/"
        real.write_text(yaml.safe_dump(cfg))
        swap.symlink_to(real)
        swap.replace(path)
        for _ in range(100):
            if await _reloads(admin, "success") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("a good file after the FIFO did not reload")
        # once more, and SIGTERM while the path is a FIFO
        swap.symlink_to(fifo)
        swap.replace(path)
        for _ in range(100):
            if await _reloads(admin, "failure") == 2:  # the second swap
                break
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        events = _events((tmp_path / "stdout.log").read_bytes())
        failed = [e for e in events if e["event"] == "config_reload_failed"]
        assert len(failed) == 2
        assert "is not a regular file (a FIFO)" in failed[0]["errors"][0]
    finally:
        unblock_fifos(tmp_path)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_port_in_use_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "gateway.yaml"
        path.write_text(
            yaml.safe_dump(
                {"listen": {"host": "127.0.0.1", "port": port},
                 "admin": {"host": "127.0.0.1", "port": free_port()}}
            )
        )  # fmt: skip
        r = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert r.returncode == 1
    assert b"cannot listen" in r.stderr
    assert b"Traceback" not in r.stderr
    assert b'"event":"listen_failed"' in r.stdout


async def test_run_keeps_startup_objects_out_of_full_collections(tmp_path: Path) -> None:
    """`run()` (what `gateway serve` does) freezes what exists once started."""
    path, port, _ = _config(tmp_path, "http://127.0.0.1:9")
    gw = Gateway(load_file(str(path)), config_path=str(path))
    gc.unfreeze()
    before = gc.get_threshold()
    task = asyncio.create_task(gw.run())
    try:
        await wait_for(lambda: gc.get_freeze_count() > 0, 10)
        assert gw.proxy_port == port
        assert gc.get_freeze_count() > 0
        # young-generation passes are rarer while serving, and back to normal after
        assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
    finally:
        gw.request_stop()
        await asyncio.wait_for(task, 15)
        gc.unfreeze()
    assert gc.get_threshold() == before
