"""Overload scenario (SPEC section 10): a crowd floods a bulk route of a fixed-capacity
upstream while a critical caller and the probes must go on being served.

One run, on loopback, against three configs of the gateway (`defaults`: max_inflight 500,
fixed; `bulkhead`: a hand-tuned max_inflight 10, fixed; `adaptive`: adaptive limit and
route priorities, no tuned number), then `adaptive` again in front of an upstream of twice
the capacity. For each: the critical route's p99 alone and during the flood, its success
rate, the flood's goodput (2xx a second) and the probes' p99. See bench/README.md.

```sh
.venv/bin/python bench/overload.py            # about 2 minutes
.venv/bin/python bench/overload.py --quick    # about 1 minute
.venv/bin/python bench/overload.py --c1       # c=1 added p50, adaptive against fixed
```

The upstream (a small asyncio server started by this script) works ``--capacity``
requests at once, ``--service-ms`` each, and queues the rest, like an application
server with a fixed worker pool.  The gateway is pinned to one CPU; the upstream, wrk (the
flood: ``-c256``, closed loop, on the bulk route) and this script (the critical caller,
open loop at 20 req/s with keep-alive connections, and the probe, ``GET /readyz`` on the
proxy port every 50 ms over a new connection each time, as a kubelet does) on the other.
wrk runs at nice 10 there, so that the callers measured are not delayed by the load
generator's own CPU use on the load CPU: what they measure is the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import (
    BENCH,
    BenchError,
    Children,
    Proc,
    Wrk,
    _child_setup,
    _which,
    cpu_busy,
    cpus,
    free_port,
    http_get,
    parse_wrk,
    spawn_gateway,
    wait_http,
)

CRITICAL_RATE = 20.0  # requests a second on the critical route
PROBE_INTERVAL_S = 0.05
FLOOD_CONNECTIONS = 256
GOAL_P99_RATIO = 2.0
GOAL_SUCCESS = 0.999
GOAL_GOODPUT = 0.9
GOAL_PROBE_P99_MS = 10.0

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


# --------------------------------------------------------------------------- the upstream


async def serve_upstream(port: int, capacity: int, service_s: float) -> None:
    """Work ``capacity`` requests at once, ``service_s`` each; the others wait their turn
    (FIFO). ``/health`` is answered at once."""
    workers = asyncio.Semaphore(capacity)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.split(b" ", 2)[1].startswith(b"/health"):
                    async with workers:
                        await asyncio.sleep(service_s)
                writer.write(_RESPONSE)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def _upstream_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--capacity", type=int, required=True)
    p.add_argument("--service-ms", type=float, required=True)
    a = p.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional

        uvloop.install()  # type: ignore[attr-defined,unused-ignore]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_upstream(a.port, a.capacity, a.service_ms / 1000))
    return 0


def spawn_upstream(
    children: Children, *, capacity: int, service_ms: float, cpu: int, name: str = "upstream"
) -> Proc:
    port = free_port()
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "upstream",
        f"--port={port}",
        f"--capacity={capacity}",
        f"--service-ms={service_ms}",
    ]
    proc = children.spawn(name, argv, cpu=cpu, port=port)
    wait_http(proc, port, "/health", 10)
    return proc


# --------------------------------------------------------------------------- a small client


class Conn:
    """One HTTP/1.1 connection (GET only; answers framed by Content-Length or close)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, path: str, *, close: bool = False) -> int:
        extra = "Connection: close\r\n" if close else ""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{extra}\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length >= 0:
            await self.reader.readexactly(length)
        else:
            await self.reader.read()
        return status

    def close(self) -> None:
        self.writer.close()


@dataclass
class Calls:
    """What a caller saw: (latency s, status) a request; status 0 for a failed one."""

    seen: list[tuple[float, int]] = field(default_factory=list)

    def p(self, q: float) -> float:
        lat = sorted(x[0] for x in self.seen)
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000

    @property
    def success(self) -> float:
        if not self.seen:
            return float("nan")
        return sum(1 for _, s in self.seen if 200 <= s < 300) / len(self.seen)


async def critical_caller(port: int, path: str, rate: float, stop: asyncio.Event) -> Calls:
    """Open loop: a request every 1/rate s whatever the answers take (keep-alive pool)."""
    calls = Calls()
    idle: list[Conn] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        t0 = time.perf_counter()
        conn: Conn | None = None
        try:
            conn = idle.pop() if idle else await Conn.open(port)
            status = await asyncio.wait_for(conn.get(path), 10)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status = 0
            if conn is not None:
                conn.close()
        else:
            idle.append(conn)
        calls.seen.append((time.perf_counter() - t0, status))

    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += 1 / rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return calls


async def prober(port: int, stop: asyncio.Event) -> Calls:
    """``GET /readyz`` every 50 ms, a new connection each time (as a kubelet does)."""
    calls = Calls()
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn = await Conn.open(port)
            try:
                status = await asyncio.wait_for(conn.get("/readyz", close=True), 10)
            finally:
                conn.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            status = 0
        calls.seen.append((time.perf_counter() - t0, status))
        next_at += PROBE_INTERVAL_S
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    return calls


async def callers(port: int, seconds: float) -> tuple[Calls, Calls]:
    stop = asyncio.Event()
    crit = asyncio.create_task(critical_caller(port, "/login/x", CRITICAL_RATE, stop))
    probes = asyncio.create_task(prober(port, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await crit, await probes


# --------------------------------------------------------------------------- gateway configs


@dataclass
class Variant:
    key: str
    what: str
    upstream: dict[str, Any]
    priorities: bool


VARIANTS = (
    Variant("defaults", "defaults (max_inflight 500, fixed)", {}, priorities=False),
    Variant(
        "bulkhead",
        "hand-tuned bulkhead (max_inflight 10, fixed)",
        {"max_inflight": 10},
        priorities=False,
    ),
    Variant(
        "adaptive",
        "adaptive + priorities (no tuned number)",
        {"concurrency": {"mode": "adaptive"}},
        priorities=True,
    ),
)


def scenario_config(
    tmp: Path, v: Variant, *, port: int, admin_port: int, up_port: int, tag: str = ""
) -> Path:
    """bench/gateway-memory.yaml (the full pipeline) with three routes on one upstream."""
    import yaml  # noqa: PLC0415 - a dependency of the gateway, present in its venv

    cfg: dict[str, Any] = yaml.safe_load((BENCH / "gateway-memory.yaml").read_text())
    cfg["listen"]["port"] = port
    cfg["admin"]["port"] = admin_port
    cfg["upstreams"]["api"] = {
        "url": f"http://127.0.0.1:{up_port}",
        "health": {"path": "/health", "interval_s": 5},
        **v.upstream,
    }
    limits = ["per-ip-burst", "per-ip-hourly"]
    cfg["routes"] = [
        {"name": "login", "path_prefix": "/login/", "upstream": "api", "rate_limits": limits},
        {"name": "bulk", "path_prefix": "/bulk/", "upstream": "api", "rate_limits": limits},
        {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": limits},
    ]
    if v.priorities:
        cfg["routes"][0]["priority"] = "critical"
        cfg["routes"][1]["priority"] = "bulk"
    path = tmp / f"gw-{v.key}{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_metric(admin_port: int, metric: str, **labels: str) -> float | None:
    """One sample of ``metric`` (the sum of those matching ``labels``) from /metrics."""
    try:
        status, _, body = http_get(admin_port, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = None
    for line in body.decode().splitlines():
        if line.startswith(metric) and line[len(metric)] in " {":
            name = line.rsplit(" ", 1)[0]
            if all(w in name for w in want):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def bulk_2xx(admin_port: int) -> float:
    return sum(
        read_metric(admin_port, "gateway_requests_total", route="bulk", code=code) or 0.0
        for code in ("200",)
    )


# --------------------------------------------------------------------------- one variant


@dataclass
class Row:
    variant: Variant
    capacity: int
    alone: Calls
    flood: Calls
    probes_alone: Calls
    probes: Calls
    goodput: float
    flood_rps: float
    limits: list[float]
    gw_cpu: float  # the gateway's CPU share during the flood window (0..1)
    foreign: float  # other processes' share of the gateway's CPU meanwhile (0..1)

    @property
    def p99_ratio(self) -> float:
        return self.flood.p(0.99) / self.alone.p(0.99)

    @property
    def median_limit(self) -> float:
        return statistics.median(self.limits) if self.limits else float("nan")


def start_flood(wrk: str, cpu: int, url: str, seconds: float, conns: int) -> subprocess.Popen[str]:
    setup = _child_setup(cpu)

    def niced() -> None:
        setup()
        os.nice(10)

    argv = [wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", url]
    popen = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=niced,  # noqa: PLW1509 - no threads exist here
    )
    Wrk.running.add(popen)
    return popen


def run_variant(
    args: argparse.Namespace,
    children: Children,
    tmp: Path,
    v: Variant,
    *,
    up: Proc,
    capacity: int,
    tag: str = "",
) -> Row:
    load_cpu, proxy_cpu = cpus()
    port, admin_port = free_port(), free_port()
    cfg = scenario_config(tmp, v, port=port, admin_port=admin_port, up_port=up.port, tag=tag)
    gw = spawn_gateway(children, f"gw-{v.key}{tag}", cfg, port=port, cpu=proxy_cpu, redis_url=None)
    try:
        wait_http(gw, port, "/readyz", 20)
        asyncio.run(callers(port, min(1.0, args.alone)))  # warm-up: connections, samples
        alone, probes_alone = asyncio.run(callers(port, args.alone))
        total = args.settle + args.duration + 1
        flood = start_flood(
            args.wrk, load_cpu, f"http://127.0.0.1:{port}/bulk/x", total, args.connections
        )
        time.sleep(args.settle)
        limits: list[float] = []

        async def window() -> tuple[Calls, Calls]:
            task = asyncio.create_task(callers(port, args.duration))
            while not task.done():
                lim = await asyncio.to_thread(
                    read_metric, admin_port, "gateway_upstream_concurrency_limit", upstream="api"
                )
                if lim is not None:
                    limits.append(lim)
                await asyncio.sleep(0.5)
            return await task

        ok0, cpu0, busy0 = bulk_2xx(admin_port), gw.cpu_seconds(), cpu_busy()[proxy_cpu]
        t0 = time.monotonic()
        crit, probes = asyncio.run(window())
        ok1, cpu1, busy1 = bulk_2xx(admin_port), gw.cpu_seconds(), cpu_busy()[proxy_cpu]
        t1 = time.monotonic()
        flood_out = Wrk.finish(flood, total)
        return Row(
            variant=v,
            capacity=capacity,
            alone=alone,
            flood=crit,
            probes_alone=probes_alone,
            probes=probes,
            goodput=(ok1 - ok0) / (t1 - t0),
            flood_rps=flood_out.rps,
            limits=limits,
            gw_cpu=(cpu1 - cpu0) / (t1 - t0),
            foreign=max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / (t1 - t0),
        )
    finally:
        children.stop(gw)


def upstream_capacity(wrk: str, cpu: int, port: int, seconds: float) -> float:
    """The upstream's own throughput, measured directly (closed loop, 64 connections)."""
    argv = [wrk, "-t1", "-c64", f"-d{max(1, round(seconds))}s", f"http://127.0.0.1:{port}/x"]
    out = subprocess.run(  # noqa: PLW1510 - its output says whether it worked
        argv,
        capture_output=True,
        text=True,
        preexec_fn=_child_setup(cpu),
        timeout=seconds + 30,
    )
    return parse_wrk(out.stdout).rps


# --------------------------------------------------------------------------- report


def _ms(x: float) -> str:
    return f"{x:,.1f}"


def _pct(x: float) -> str:
    return f"{x * 100:.1f} %" if x < 0.999 or x >= 1 else f"{x * 100:.2f} %"


def table(rows: list[Row], capacity: dict[int, float]) -> list[str]:
    out = [
        (
            "| config | upstream | critical p99 alone | critical p99 in the flood | critical"
            " success | flood goodput (2xx/s) | probes p99 (alone / flood) | limit (median) |"
            " flood req/s | gateway CPU (others) |"
        ),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        cap = capacity[r.capacity]
        out.append(
            f"| {r.variant.what} | {r.capacity} x {ARGS_SERVICE_MS[0]:g} ms ({cap:,.0f}/s)"
            f" | {_ms(r.alone.p(0.99))} ms | {_ms(r.flood.p(0.99))} ms ({r.p99_ratio:.1f}x)"
            f" | {_pct(r.flood.success)} ({len(r.flood.seen)})"
            f" | {r.goodput:,.0f} ({r.goodput / cap * 100:.0f} %)"
            f" | {_ms(r.probes_alone.p(0.99))} / {_ms(r.probes.p(0.99))} ms"
            f" | {r.median_limit:,.0f} | {r.flood_rps:,.0f}"
            f" | {r.gw_cpu * 100:.0f} % ({r.foreign * 100:.0f} %) |"
        )
    return out


ARGS_SERVICE_MS = [20.0]


def checks(rows: list[Row], capacity: dict[int, float]) -> list[str]:
    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    out = []
    adaptive = [r for r in rows if r.variant.key == "adaptive"]
    for r in adaptive:
        cap = capacity[r.capacity]
        out += [
            (
                f"- adaptive, {r.capacity} at once: critical p99 in the flood {r.p99_ratio:.2f}x"
                f" its p99 alone (goal <= {GOAL_P99_RATIO:g}x):"
                f" {mark(r.p99_ratio <= GOAL_P99_RATIO)}"
            ),
            (
                f"- adaptive, {r.capacity} at once: critical success {r.flood.success * 100:.2f} %"
                f" (goal >= {GOAL_SUCCESS * 100:g} %): {mark(r.flood.success >= GOAL_SUCCESS)}"
            ),
            (
                f"- adaptive, {r.capacity} at once: goodput {r.goodput / cap * 100:.0f} % of the"
                f" upstream's measured capacity (goal >= {GOAL_GOODPUT * 100:g} %):"
                f" {mark(r.goodput >= GOAL_GOODPUT * cap)}"
            ),
            (
                f"- adaptive, {r.capacity} at once: probes p99 {r.probes.p(0.99):.1f} ms"
                f" (goal <= {GOAL_PROBE_P99_MS:g} ms):"
                f" {mark(r.probes.p(0.99) <= GOAL_PROBE_P99_MS)}"
            ),
        ]
    if len(adaptive) == 2:
        ratio = adaptive[1].median_limit / adaptive[0].median_limit
        out.append(
            f"- learned limit with twice the capacity: {adaptive[1].median_limit:.0f} against"
            f" {adaptive[0].median_limit:.0f}, {ratio:.2f}x (goal: about 2x, 1.5-2.5):"
            f" {mark(1.5 <= ratio <= 2.5)}"
        )
    return out


# --------------------------------------------------------------------------- c=1


def measure_c1(args: argparse.Namespace, children: Children, tmp: Path) -> list[str]:
    """c=1 p50 through a fixed and an adaptive gateway (and directly), rounds interleaved;
    the upstream answers at once (no overload anywhere)."""
    load_cpu, proxy_cpu = cpus()
    up = spawn_upstream(children, capacity=1000, service_ms=0, cpu=load_cpu, name="c1-upstream")
    plain = Variant("fixed", "fixed", {}, priorities=False)
    adapt = Variant("adaptive", "adaptive", {"concurrency": {"mode": "adaptive"}}, priorities=False)
    ports: dict[str, int] = {"direct": up.port}
    for v in (plain, adapt):
        port, admin_port = free_port(), free_port()
        cfg = scenario_config(tmp, v, port=port, admin_port=admin_port, up_port=up.port, tag="-c1")
        gw = spawn_gateway(children, f"c1-{v.key}", cfg, port=port, cpu=proxy_cpu, redis_url=None)
        wait_http(gw, port, "/readyz", 20)
        ports[v.key] = port
    wrk = Wrk(args.wrk, load_cpu, proxy_cpu)
    for key in ("fixed", "adaptive"):  # warm-up
        wrk.run(f"http://127.0.0.1:{ports[key]}/x", 1, 2)
    p50: dict[str, list[float]] = {k: [] for k in ports}
    for rnd in range(args.c1_rounds):
        order = list(ports)
        order = order[rnd % 3 :] + order[: rnd % 3]
        for key in order:
            res = wrk.run(f"http://127.0.0.1:{ports[key]}/x", 1, args.c1_duration)
            if res.errors:
                raise BenchError(f"c=1 {key}: {res.errors} errors")
            p50[key].append(res.p50_us)
    direct = statistics.median(p50["direct"])
    out = [
        "| gateway | c=1 p50 µs (median of rounds) | added p50 µs | rounds |",
        "|---|--:|--:|---|",
    ]
    for key in ("direct", "fixed", "adaptive"):
        med = statistics.median(p50[key])
        rounds = ", ".join(f"{x:.0f}" for x in p50[key])
        added = "" if key == "direct" else f"{med - direct:.0f}"
        out.append(f"| {key} | {med:.0f} | {added} | {rounds} |")
    diff = statistics.median(p50["adaptive"]) - statistics.median(p50["fixed"])
    out.append("")
    out.append(f"adaptive - fixed, c=1 p50: {diff:+.0f} µs")
    return out


# --------------------------------------------------------------------------- refusal cost


def measure_refusal_cost(args: argparse.Namespace, children: Children, tmp: Path) -> list[str]:
    """The gateway's CPU per refused request: a 503 at the upstream's limit (fixed mode:
    refused at once) against a 429 of a rate-limit policy, same pipeline otherwise (abuse
    scoring off, or the 429s would end in a ban); wrk -c50, rounds interleaved."""
    import yaml  # noqa: PLC0415 - a dependency of the gateway, present in its venv

    load_cpu, proxy_cpu = cpus()
    up = spawn_upstream(children, capacity=1, service_ms=600_000, cpu=load_cpu, name="slow")
    gws: dict[str, tuple[Proc, int]] = {}
    for key in ("503", "429"):
        port, admin_port = free_port(), free_port()
        v = Variant(key, key, {"max_inflight": 1} if key == "503" else {}, priorities=False)
        path = scenario_config(tmp, v, port=port, admin_port=admin_port, up_port=up.port)
        cfg = yaml.safe_load(path.read_text())
        cfg["abuse"] = {"enabled": False}
        if key == "429":
            cfg["rate_limit"]["policies"]["per-ip-burst"] = {"requests": 1, "period_s": 3600}
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        gw = spawn_gateway(children, f"gw-{key}", path, port=port, cpu=proxy_cpu, redis_url=None)
        wait_http(gw, port, "/readyz", 20)
        gws[key] = (gw, port)
    # a request the upstream never answers: the 503 gateway's one slot, and the 429
    # gateway's one request of the hour
    holds = [socket.create_connection(("127.0.0.1", port)) for _, port in gws.values()]
    for hold in holds:
        hold.sendall(b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n")
    time.sleep(0.5)
    for key, (_, port) in gws.items():
        if (status := http_get(port, "/x")[0]) != int(key):
            raise BenchError(f"the {key} gateway answered {status}")
    wrk = Wrk(args.wrk, load_cpu, proxy_cpu)
    per: dict[str, list[float]] = {"503": [], "429": []}
    try:
        for rnd in range(args.c1_rounds):
            for key in ("503", "429") if rnd % 2 == 0 else ("429", "503"):
                gw, port = gws[key]
                res = wrk.run(f"http://127.0.0.1:{port}/x", 50, args.c1_duration, proc=gw)
                per[key].append(res.cpu_us_per_req)
    finally:
        for hold in holds:
            hold.close()
    out = ["| refusal | gateway CPU µs/request (median) | rounds |", "|---|--:|---|"]
    for key, what in (("503", "503 at the limit (fixed)"), ("429", "429 of a rate policy")):
        rounds = ", ".join(f"{x:.1f}" for x in per[key])
        out.append(f"| {what} | {statistics.median(per[key]):.1f} | {rounds} |")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The overload scenario of SPEC section 10.")
    p.add_argument("--quick", action="store_true", help="shorter phases (about 1 minute)")
    p.add_argument("--duration", type=float, help="seconds measured in the flood (default 10)")
    p.add_argument("--alone", type=float, help="seconds measured without the flood (default 6)")
    p.add_argument("--settle", type=float, help="seconds of flood before measuring (default 3)")
    p.add_argument("--capacity", type=int, default=8, help="requests the upstream works at once")
    p.add_argument("--connections", type=int, default=FLOOD_CONNECTIONS, help="the flood's")
    p.add_argument("--capacity-s", type=float, default=3.0, help="upstream measured alone")
    p.add_argument("--service-ms", type=float, default=20.0, help="each request's work")
    p.add_argument(
        "--only", choices=[v.key for v in VARIANTS], action="append", help="run these configs"
    )
    p.add_argument("--no-double", action="store_true", help="skip the 2x-capacity run")
    p.add_argument("--c1", action="store_true", help="measure c=1 added p50 (fixed/adaptive)")
    p.add_argument("--refusal-cost", action="store_true", help="CPU of a 503 against a 429")
    p.add_argument("--c1-rounds", type=int, default=5)
    p.add_argument("--c1-duration", type=float, default=4.0)
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    args = p.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    args.alone = args.alone or (3.0 if args.quick else 6.0)
    args.settle = args.settle or (2.0 if args.quick else 3.0)
    return args


def scenario(args: argparse.Namespace, children: Children, tmp: Path) -> list[str]:
    load_cpu, _ = cpus()
    ARGS_SERVICE_MS[0] = args.service_ms
    rows: list[Row] = []
    capacity: dict[int, float] = {}
    sizes = [args.capacity] if args.no_double else [args.capacity, args.capacity * 2]
    for size in sizes:
        up = spawn_upstream(children, capacity=size, service_ms=args.service_ms, cpu=load_cpu)
        capacity[size] = upstream_capacity(args.wrk, load_cpu, up.port, args.capacity_s)
        print(f"upstream {size} x {args.service_ms:g} ms: {capacity[size]:,.0f} req/s measured")
        chosen = [v for v in VARIANTS if not args.only or v.key in args.only]
        if size != args.capacity:
            chosen = [v for v in VARIANTS if v.key == "adaptive"]
        for v in chosen:
            row = run_variant(args, children, tmp, v, up=up, capacity=size, tag=f"-{size}")
            rows.append(row)
            print("\n".join(table([row], capacity)[2:]), flush=True)
            if v.key == "adaptive":
                print("limits:", " ".join(f"{x:.0f}" for x in row.limits), flush=True)
        children.stop(up)
    return [
        (
            f"Flood: wrk -c{args.connections} closed loop on /bulk/ ({args.settle:g} s before"
            f" measuring, {args.duration:g} s measured); critical caller {CRITICAL_RATE:g} req/s"
            f" on /login/; probe GET /readyz every {PROBE_INTERVAL_S * 1000:g} ms (new connection)."
            f" Alone: {args.alone:g} s without the flood."
        ),
        "",
        *table(rows, capacity),
        "",
        *checks(rows, capacity),
    ]


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upstream"]:
        return _upstream_main(argv[1:])
    args = parse_args(argv)
    wrk = _which("wrk")
    if wrk is None:
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    args.wrk = wrk
    load_cpu, _ = cpus()
    os.sched_setaffinity(0, {load_cpu})  # this script stays off the gateway's CPU
    report: Callable[[], list[str]]
    with tempfile.TemporaryDirectory(prefix="gw-overload-") as d, _signals():
        tmp = Path(d)
        children = Children(tmp)
        try:
            if args.c1:
                report = lambda: measure_c1(args, children, tmp)  # noqa: E731
            elif args.refusal_cost:
                report = lambda: measure_refusal_cost(args, children, tmp)  # noqa: E731
            else:
                report = lambda: scenario(args, children, tmp)  # noqa: E731
            lines = report()
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            Wrk.kill_all()
            children.stop_all()
    text = "\n".join(lines)
    print()
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
