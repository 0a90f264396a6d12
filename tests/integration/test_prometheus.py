"""A real Prometheus server scrapes the gateway's admin port and stores its series.

Uses the ``prometheus`` binary (Debian package ``prometheus``); skipped when it is absent.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import free_port
from tests.gw import base_config, running_gateway, serve, url

pytestmark = pytest.mark.timeout(60)

SCRAPE_WAIT_S = 20.0


class Prometheus:
    """A Prometheus server of the test's own on a free loopback port."""

    def __init__(self, exe: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    # Prometheus takes any positive duration; the timeout must not exceed it
                    "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"},
                    "scrape_configs": [
                        {"job_name": "gateway", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.args = [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with session.get(self.base + path, params=params) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert body["status"] == "success", body
            return body["data"]

    async def until(
        self, session: aiohttp.ClientSession, query: str, done: Any
    ) -> list[dict[str, Any]]:
        """Run ``query`` until ``done(result)`` or SCRAPE_WAIT_S pass; return the result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SCRAPE_WAIT_S
        result: list[dict[str, Any]] = []
        while loop.time() < deadline:
            assert self.proc is not None
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            try:
                result = (await self.api(session, "/api/v1/query", query=query))["result"]
            except aiohttp.ClientConnectionError:
                result = []  # not listening yet
            if done(result):
                return result
            await asyncio.sleep(0.2)
        raise AssertionError(f"{query}: {result} after {SCRAPE_WAIT_S}s\n{self.log_tail()}")


@pytest.fixture
def prometheus_exe() -> str:
    exe = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if exe is None:
        pytest.skip("the prometheus server binary is not installed (Debian package `prometheus`)")
    return exe


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=404 if request.path == "/missing" else 200, text="ok")

    async with serve(answer) as url_:
        yield url_


@pytest.fixture
def make_prometheus(prometheus_exe: str, tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def make(target: str) -> Prometheus:
        prom = Prometheus(prometheus_exe, tmp_path, target)
        prom.start()
        started.append(prom)
        return prom

    yield make
    for prom in started:
        prom.stop()


async def test_prometheus_scrapes_request_series(upstream: str, make_prometheus: Any) -> None:
    cfg = base_config(upstream)
    async with running_gateway(cfg, {}) as gw, aiohttp.ClientSession() as s:
        prom: Prometheus = make_prometheus(f"127.0.0.1:{gw.admin_port}")
        for path in ("/a", "/b", "/missing"):
            async with s.get(url(gw, path)) as resp:
                assert resp.status == (404 if path == "/missing" else 200)
        async with s.post(url(gw, "/c"), data=b"x") as resp:
            assert resp.status == 200

        series = await prom.until(s, "gateway_requests_total", lambda r: len(r) >= 3)
        got = {
            (m["route"], m["method"], m["code"]): float(r["value"][1])
            for r in series
            for m in [r["metric"]]
        }
        assert got == {
            ("api", "GET", "200"): 2,
            ("api", "GET", "404"): 1,
            ("api", "POST", "200"): 1,
        }
        for r in series:
            labels = set(r["metric"]) - {"__name__", "job", "instance"}
            assert labels == {"route", "method", "code"}, r["metric"]
            assert r["metric"]["job"] == "gateway"

        # the scrape itself is healthy (content type and format accepted by the server)
        up = await prom.until(s, 'up{job="gateway"}', lambda r: len(r) == 1)
        assert up[0]["value"][1] == "1"
        targets = await prom.api(s, "/api/v1/targets", state="active")
        (target,) = targets["activeTargets"]
        assert target["health"] == "up", target
        assert target["lastError"] == "", target

        # a histogram makes it through as buckets a quantile can be computed from
        q = "histogram_quantile(0.5, sum by (le) (gateway_request_duration_seconds_bucket))"
        result = await prom.until(s, q, lambda r: len(r) == 1)
        assert float(result[0]["value"][1]) >= 0
