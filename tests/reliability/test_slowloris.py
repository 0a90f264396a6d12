"""Slow clients with slowhttptest: 500 slow connections while a normal client is served.

``-H`` (Slowloris) sends the request head a header at a time; ``request.client_timeout_s``
(2 s here) must answer each with a 408 and close it, whatever it keeps sending.  ``-B``
(R-U-Dead-Yet) sends a complete head and then the body a few bytes a second.  Meanwhile a
normal client asks every 100 ms and must get every answer within 1 s.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.reliability.support import (
    UpstreamProcess,
    gateway_config,
    gateway_process,
    metric_sum,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.slow, pytest.mark.timeout(90)]

CONNECTIONS = 500
CLIENT_TIMEOUT_S = 2.0
SLOWHTTPTEST = shutil.which("slowhttptest")
needs_tool = pytest.mark.skipif(
    SLOWHTTPTEST is None,
    reason="slowhttptest is not installed (Debian package `slowhttptest`: apt-get install -y"
    " slowhttptest; .ci/run installs it)",
)


@dataclass
class Run:
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    stats: list[dict[str, int]] = field(default_factory=list)  # slowhttptest, one row a second
    max_fds: int = 0
    fds_before: int = 0
    fds_after: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


async def _attack(upstream: UpstreamProcess, tmp_path: Path, mode: str, length_s: int) -> Run:
    assert SLOWHTTPTEST is not None
    cfg = gateway_config(
        upstream.url,
        request={"client_timeout_s": CLIENT_TIMEOUT_S},
        # scored but not blocking: the attack and the normal client share 127.0.0.1 here
        abuse={"enabled": True, "mode": "shadow"},
    )
    run = Run()
    async with gateway_process(cfg, name="slow") as gw, aiohttp.ClientSession() as s:
        run.fds_before = gw.fd_count()
        proc = await asyncio.create_subprocess_exec(
            SLOWHTTPTEST,
            mode,
            "-c",
            str(CONNECTIONS),
            "-r",
            "250",
            "-i",
            "1",
            "-x",
            "10",
            "-s",
            "8192",
            "-l",
            str(length_s),
            "-p",
            "2",
            "-g",
            "-o",
            str(tmp_path / "stats"),
            "-u",
            gw.url("/"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            while proc.returncode is None:
                t0 = time.monotonic()
                try:
                    async with s.get(gw.url("/normal"), timeout=timeout) as r:
                        await r.read()
                        key = str(r.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    key = type(exc).__name__
                run.statuses[key] = run.statuses.get(key, 0) + 1
                run.latencies.append(time.monotonic() - t0)
                run.max_fds = max(run.max_fds, gw.fd_count())
                await asyncio.sleep(0.1)
                if time.monotonic() - t0 > length_s + 20:
                    break
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await asyncio.sleep(CLIENT_TIMEOUT_S + 0.5)
        run.fds_after = gw.fd_count()
        run.metrics = await gw.metrics()
    with (tmp_path / "stats.csv").open() as f:
        run.stats = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return run


@needs_tool
async def test_slow_headers_are_cut_at_client_timeout(
    upstream: UpstreamProcess, tmp_path: Path
) -> None:
    run = await _attack(upstream, tmp_path, "-H", 8)
    peak = max(row["Connected"] for row in run.stats)
    closed = run.stats[-1]["Closed"]
    timeouts = metric_sum(run.metrics, "gateway_requests_total", code="408")
    report(
        "slowloris -H",
        normal=run.statuses,
        normal_max_latency_ms=round(max(run.latencies) * 1000, 1),
        slow_peak_connected=peak,
        slow_closed=closed,
        slow_test_seconds=len(run.stats) - 1,
        gateway_408s=timeouts,
        fds=(run.fds_before, run.max_fds, run.fds_after),
    )
    assert set(run.statuses) == {"200"}, run.statuses
    assert len(run.latencies) >= 20
    assert max(run.latencies) < 1.0
    assert peak >= CONNECTIONS * 0.8  # the attack really held its connections open
    assert closed >= peak * 0.95  # ... and the gateway closed them
    assert timeouts >= closed * 0.95  # each with a 408
    # no connection outlived the deadline by much: the test ran out of connections early
    assert len(run.stats) - 1 <= 2 + CLIENT_TIMEOUT_S + 2
    assert run.fds_after <= run.fds_before + 5


@needs_tool
async def test_slow_bodies_do_not_starve_normal_clients(
    upstream: UpstreamProcess, tmp_path: Path
) -> None:
    run = await _attack(upstream, tmp_path, "-B", 6)
    report(
        "slowloris -B",
        normal=run.statuses,
        normal_max_latency_ms=round(max(run.latencies) * 1000, 1),
        slow_peak_connected=max(row["Connected"] for row in run.stats),
        service_available=[row["Service Available"] for row in run.stats],
        fds=(run.fds_before, run.max_fds, run.fds_after),
    )
    assert set(run.statuses) == {"200"}, run.statuses
    assert max(run.latencies) < 1.0
