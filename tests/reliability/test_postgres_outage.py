"""PostgreSQL stopped and started under a gateway: probes follow, nothing restarts.

A private PostgreSQL (initdb into a temporary directory, run as the ``postgres`` user
when the tests run as root) is stopped and started again while two gateways watch it,
one with ``database.critical: true`` and one with ``false``.  ``/livez`` must stay 200
throughout on both; ``/readyz`` follows ``critical``; probes answer from cached results
(fast, never waiting on the database); proxied traffic is not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.reliability.support import (
    GatewayProcess,
    RawUpstream,
    Tally,
    gateway_config,
    gateway_process,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

INTERVAL_S = 0.2
TIMEOUT_S = 0.5


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own, on a free loopback port."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            pytest.skip("PostgreSQL server binaries are not installed (/usr/lib/postgresql)")
        self.bin = found[-1].parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.dir / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            # postgres refuses to run as root: run it as the postgres user
            if shutil.which("runuser") is None:
                pytest.skip("running as root and `runuser` is missing: cannot start PostgreSQL")
            try:
                shutil.chown(self.dir, user="postgres")
            except (LookupError, OSError) as exc:
                pytest.skip(f"running as root and no usable `postgres` user: {exc}")
            self.prefix = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 30) -> None:
        r = subprocess.run([*self.prefix, *args], capture_output=True, timeout=timeout, check=False)
        if r.returncode != 0:
            msg = f"{args[0]} failed ({r.returncode}): {r.stderr.decode(errors='replace')}"
            raise RuntimeError(msg)

    def init(self) -> None:
        try:
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
            )
        except RuntimeError as exc:
            pytest.skip(f"initdb of a private PostgreSQL failed: {exc}")

    def start(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "pg.log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def cleanup(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        try:
            pg.start()
        except RuntimeError as exc:
            pytest.skip(f"a private PostgreSQL did not start: {exc}")
        yield pg
    finally:
        pg.cleanup()


@dataclass
class ProbeLog:
    """(time, status, latency) of every probe answer, per gateway and path."""

    rows: dict[tuple[str, str], list[tuple[float, int, float]]] = field(default_factory=dict)

    def add(self, gw: str, path: str, t: float, status: int, latency: float) -> None:
        self.rows.setdefault((gw, path), []).append((t, status, latency))

    def statuses(self, gw: str, path: str, lo: float = 0, hi: float = float("inf")) -> list[int]:
        return [st for t, st, _ in self.rows.get((gw, path), []) if lo <= t < hi]

    def first(self, gw: str, path: str, status: int, after: float) -> float | None:
        for t, st, _ in self.rows.get((gw, path), []):
            if t >= after and st == status:
                return t
        return None

    def max_latency(self) -> float:
        return max(lat for rows in self.rows.values() for _, _, lat in rows)


def _cfg(upstream_url: str, *, critical: bool) -> dict[str, object]:
    return gateway_config(
        upstream_url,
        database={"critical": critical, "interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S},
    )


async def test_postgres_stopped_and_started(
    private_postgres: PrivatePostgres, raw_upstream: RawUpstream
) -> None:
    env = {"GATEWAY_DATABASE_URL": private_postgres.dsn}
    async with AsyncExitStack() as stack:
        crit = await stack.enter_async_context(
            gateway_process(
                _cfg(raw_upstream.url, critical=True), env=env, name="pg-crit", probe="/readyz"
            )
        )
        soft = await stack.enter_async_context(
            gateway_process(
                _cfg(raw_upstream.url, critical=False), env=env, name="pg-soft", probe="/readyz"
            )
        )
        s = await stack.enter_async_context(aiohttp.ClientSession())
        gws: dict[str, GatewayProcess] = {"critical": crit, "soft": soft}
        log = ProbeLog()
        traffic = Tally()
        stop = asyncio.Event()

        async def prober(name: str, gw: GatewayProcess, path: str) -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                async with s.get(gw.url(path)) as r:
                    await r.read()
                    log.add(name, path, t0, r.status, time.monotonic() - t0)
                await asyncio.sleep(0.05)

        async def client() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.get(crit.url("/work")) as r:
                        await r.read()
                        traffic.add(r.status, time.monotonic() - t0)
                except aiohttp.ClientError as exc:
                    traffic.error(type(exc).__name__)
                await asyncio.sleep(0.02)

        tasks = [
            asyncio.create_task(prober(name, gw, path))
            for name, gw in gws.items()
            for path in ("/livez", "/readyz", "/readyz/database")
        ]
        tasks.append(asyncio.create_task(client()))
        try:
            await asyncio.sleep(1.0)
            stop_at = time.monotonic()
            await asyncio.to_thread(private_postgres.stop)
            down_at = time.monotonic()
            await asyncio.sleep(3.0)
            start_called = time.monotonic()  # the server accepts before start() returns
            await asyncio.to_thread(private_postgres.start)
            up_at = time.monotonic()
            deadline = up_at + 15
            while (
                time.monotonic() < deadline and log.first("critical", "/readyz", 200, up_at) is None
            ):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        unready_at = log.first("critical", "/readyz", 503, stop_at)
        ready_at = log.first("critical", "/readyz", 200, up_at)
        report(
            "postgres outage",
            livez={n: sorted(set(log.statuses(n, "/livez"))) for n in gws},
            pg_ctl_stop_s=round(down_at - stop_at, 2),
            critical_unready_after_s=None if unready_at is None else round(unready_at - down_at, 2),
            critical_ready_again_after_s=None if ready_at is None else round(ready_at - up_at, 2),
            soft_readyz=sorted(set(log.statuses("soft", "/readyz"))),
            max_probe_latency_ms=round(log.max_latency() * 1000, 1),
            traffic=traffic.statuses,
        )
        # liveness never depends on the database
        for name in gws:
            assert set(log.statuses(name, "/livez")) == {200}, name
        # critical: unready within a few check rounds of the stop, ready again after the
        # start, without a restart; unready the whole time in between
        assert set(log.statuses("critical", "/readyz", hi=stop_at)) == {200}
        assert unready_at is not None
        assert unready_at - down_at < 3.0
        assert ready_at is not None
        assert ready_at - up_at < 5.0
        assert set(log.statuses("critical", "/readyz", unready_at, start_called)) == {503}
        # not critical: ready throughout, while its database component reports the outage
        assert set(log.statuses("soft", "/readyz")) == {200}
        assert 503 in log.statuses("soft", "/readyz/database", stop_at, up_at)
        assert log.statuses("soft", "/readyz/database")[-1] == 200
        # probes never wait on the database
        assert log.max_latency() < 0.1
        # serving is not readiness: proxied requests went on, none failed
        assert traffic.errors == {}
        assert set(traffic.statuses) == {200}
        assert traffic.total > 100
        for gw in gws.values():
            assert gw.proc is not None
            assert gw.proc.poll() is None
            assert gw.unexpected_log_lines() == [], gw.unexpected_log_lines()[:3]
