"""Tools for the reliability suite: a gateway subprocess, raw upstreams, load and figures.

The gateway runs as ``python -m gateway serve`` (the deployed shape: uvloop, real signals,
its own RSS and file descriptors to read in ``/proc``) with its logs in a file: a pipe
nobody reads would fill up and block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def gateway_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A loopback config: one upstream `api`, one catch-all route, no limits, abuse off."""
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "upstreams": {"api": {"url": upstream_url, "health": {"interval_s": 0.2}}},
        "routes": [{"name": "api", "path_prefix": "/", "upstream": "api"}],
        "abuse": {"enabled": False},
        "drain": {"delay_s": 0, "timeout_s": 5},
        "reload": {"interval_s": 3600},
        "access_log": {"enabled": False},
    }
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value} (labels as exposed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_sum(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# --------------------------------------------------------------------------- process


class GatewayProcess:
    """``gateway serve`` in a subprocess, config and logs in a directory of its own."""

    def __init__(
        self, cfg: Mapping[str, Any], *, env: Mapping[str, str] | None = None, name: str = "gw"
    ) -> None:
        self.cfg: dict[str, Any] = dict(cfg)
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw-rel-{name}-"))
        self.config_path = self.dir / "gateway.yaml"
        self.log_path = self.dir / "stdout.log"
        self.env = {**os.environ, "GATEWAY_ADMIN_TOKEN": "t", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(self.cfg)

    @property
    def port(self) -> int:
        return int(self.cfg["listen"]["port"])

    @property
    def admin_port(self) -> int:
        return int(self.cfg["admin"]["port"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(dict(cfg)))
        tmp.replace(self.config_path)

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
            )

    async def wait_started(self, timeout: float = 15.0, probe: str = "/startupz") -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    msg = f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}"
                    raise AssertionError(msg)
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.get(self.url(probe)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        msg = f"gateway did not answer 200 on {probe} within {timeout} s:\n{self.log_tail()}"
        raise AssertionError(msg)

    def wait_started_sync(self, timeout: float = 15.0, probe: str = "/startupz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                msg = f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}"
                raise AssertionError(msg)
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", probe)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.05)
        msg = f"gateway did not answer 200 on {probe} within {timeout} s:\n{self.log_tail()}"
        raise AssertionError(msg)

    def metrics_sync(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            return parse_metrics(conn.getresponse().read().decode())
        finally:
            conn.close()

    async def metrics(self) -> dict[str, float]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(self.admin_url("/metrics")) as r,
        ):
            assert r.status == 200
            return parse_metrics(await r.text())

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        msg = "no VmRSS"
        raise AssertionError(msg)

    def fd_count(self) -> int:
        return sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir())

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        """Remove the config and logs (kept when GATEWAY_TEST_KEEP_LOGS is set)."""
        if not os.environ.get("GATEWAY_TEST_KEEP_LOGS"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def unexpected_log_lines(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """Lines that are not JSON log events, or error events not in ``allowed``."""
        bad = []
        for line in self.log_text().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                bad.append(line)
                continue
            failed = isinstance(obj, dict) and obj.get("level") in ("error", "critical")
            if not isinstance(obj, dict) or (failed and obj.get("event") not in allowed):
                bad.append(line)
        return bad


@contextlib.asynccontextmanager
async def gateway_process(
    cfg: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None = None,
    name: str = "gw",
    probe: str = "/startupz",
) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(cfg, env=env, name=name)
    gw.start()
    try:
        await gw.wait_started(probe=probe)
        yield gw
    finally:
        await asyncio.to_thread(gw.stop)
        gw.cleanup()


# --------------------------------------------------------------------------- raw upstream


@dataclass
class RawRequest:
    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def method(self) -> str:
        return self.request_line.split(" ", 1)[0]

    @property
    def target(self) -> str:
        parts = self.request_line.split(" ")
        return parts[1] if len(parts) > 1 else ""

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                out.append(v.strip().decode("latin-1"))
        return out


class _BadFramingError(Exception):
    pass


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream on a raw asyncio server that records every request head.

    It parses framing itself (Content-Length or chunked) so that a second request hidden
    in a body would show up as a second recorded request.  Answers ``200 ok``, or the
    status named by a ``/status/NNN`` path; ``/health`` is not recorded.
    """

    requests: list[RawRequest] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None
    body: bytes = b"ok"
    connections: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(
            self._serve, "127.0.0.1", port, limit=1 << 20, backlog=1024
        )
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()
            self.server = None

    def recorded(self) -> list[RawRequest]:
        return [r for r in self.requests if r.target != "/health"]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                req = RawRequest(head[:-4], b"")
                req.body = await self._read_body(reader, req)
                if req.target != "/health":
                    self.requests.append(req)
                status = 200
                if req.target.startswith("/status/"):
                    status = int(req.target[8:11])
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%s"
                    % (status, len(self.body), self.body)
                )
                await writer.drain()
        except (_BadFramingError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.writers.discard(writer)
            writer.close()

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, req: RawRequest) -> bytes:
        te = ",".join(req.header("Transfer-Encoding")).lower()
        if "chunked" in te:
            parts: list[bytes] = []
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadFramingError from None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return b"".join(parts)
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
        lengths = req.header("Content-Length")
        if lengths:
            return await reader.readexactly(int(lengths[0]))
        return b""


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / den


def report(name: str, **figures: Any) -> None:
    """Print one line of figures (visible with ``pytest -s``; kept in the captured output)."""
    parts = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"[reliability] {name}: {parts}")


@dataclass
class Tally:
    """Outcomes of a load run."""

    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def add(self, status: int, latency: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies.append(latency)

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def count(self, lo: int, hi: int) -> int:
        return sum(n for s, n in self.statuses.items() if lo <= s <= hi)


class ThreadedUpstream:
    """A :class:`RawUpstream` on an event loop of its own thread (for sync and module fixtures)."""

    def __init__(self) -> None:
        self.upstream = RawUpstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.start(), self._loop).result(10)
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class UpstreamProcess:
    """``tests/reliability/upstream_app.py`` in a process of its own, on a fixed port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.upstream_app", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.02)
            finally:
                conn.close()
        self.kill()
        msg = f"upstream on port {self.port} did not start"
        raise AssertionError(msg)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
