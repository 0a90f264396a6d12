"""Benchmark of the gateway against nginx and a naive aiohttp proxy (loopback only).

    .venv/bin/python bench/run.py            # full run, about 3-4 minutes
    .venv/bin/python bench/run.py --quick    # about 1 minute
    .venv/bin/python bench/run.py --duration 5 --rounds 2

Targets, each a single process pinned to the "proxy CPU" (CPU 1 on a 2-core machine),
all in front of the same upstream (nginx returning a fixed 200-byte body, pinned with
the load generator on the "load CPU", CPU 0):

    nginx       nginx reverse proxy: limit_req x2, 6 security headers, keep-alive pool
    naive       bench/naive_proxy.py: what a Python developer would write with aiohttp
    gw-memory   the gateway, full pipeline, bench/gateway-memory.yaml
    gw-redis    the same with rate_limit.backend: redis (skipped if it cannot start)

wrk rounds are interleaved (round-robin, the order rotating each round) and the median
of the rounds is reported. CPU per request comes from /proc/<pid>/stat (utime+stime of
the proxy and its children) over a round divided by the requests wrk counted. Results
are printed as markdown and written to bench/results.md. Missed targets are reported,
never a failure: the exit status is 0 unless the benchmark itself could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BODY = "0123456789" * 20  # the upstream's 200-byte answer
PATH = "/api/items?id=42"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# The gateway's default security headers (SPEC section 3), for the nginx equivalent.
SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=()"),
)

# Targets (print/fail thresholds); none of them makes the script fail.
TARGET_VS_NGINX = 0.5
TARGET_VS_NAIVE = 2.5
TARGET_REDIS_VS_MEMORY = 0.9
TARGET_ADDED_VS_NGINX = 2.0  # c=1 added p50 (one CPU) at most this times nginx's
TARGET_READYZ_P99_MS = 10.0
TARGET_COLD_START_S = 1.0


class BenchError(Exception):
    """The benchmark cannot go on (a tool is missing, a target does not start)."""


# --------------------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1


def _child_setup(cpu: int) -> Callable[[], None]:
    """Run in the child before exec: pin it, and have it killed if this script dies."""

    def setup() -> None:
        os.sched_setaffinity(0, {cpu})
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


@dataclass
class Proc:
    """A child process started by the benchmark (nginx counts with its workers)."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    cpu: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """This process and its direct children (nginx's master and worker)."""
        found = [self.pid]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == self.pid:
                    found.append(int(entry.name))
        return found

    @contextlib.contextmanager
    def moved_to(self, cpu: int) -> Iterator[None]:
        """Run every thread of this process (and its children) on ``cpu`` for a while."""

        def pin(where: int) -> None:
            for _ in range(2):  # twice: a thread started during the first pass is caught
                for pid in self.pids():
                    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                        for task in Path(f"/proc/{pid}/task").iterdir():
                            with contextlib.suppress(ProcessLookupError):
                                os.sched_setaffinity(int(task.name), {where})

        try:
            pin(cpu)
            if os.sched_getaffinity(self.pid) != {cpu}:
                raise BenchError(f"{self.name}: could not be moved to CPU {cpu}")
            yield
        finally:
            pin(self.cpu)

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                f = _stat_fields(pid)
                ticks += int(f[11]) + int(f[12])  # utime + stime
        return ticks / CLK_TCK

    def rss_mib(self) -> float:
        kib = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        kib += int(line.split()[1])
        return kib / 1024

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Children:
    """Every process the benchmark starts; all of them are stopped by :meth:`stop_all`."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int,
        port: int,
        env: dict[str, str] | None = None,
    ) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as err:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # the gateway's access log goes nowhere
                stderr=err,
                cwd=ROOT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches this script only; it stops them
                preexec_fn=_child_setup(cpu),  # noqa: PLW1509 - no threads exist here
            )
        proc = Proc(name, popen, port, log, cpu)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        # nginx workers (same session) must not outlive their master
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_http(proc: Proc, port: int, path: str, timeout: float, *, want: int = 200) -> float:
    """Poll until ``path`` answers ``want``; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(port, path, timeout=0.5)[0] == want:
                return time.monotonic() - start
        time.sleep(0.005)
    raise BenchError(f"{proc.name}: {path} did not answer {want} within {timeout:.0f} s")


# --------------------------------------------------------------------------- tools


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def ensure_tools(tmp: Path, *, install: bool) -> dict[str, str]:
    """Find nginx and wrk, installing Debian's packages when allowed; else exit."""
    tools = {name: _which(name) for name in ("nginx", "wrk")}
    missing = [n for n, p in tools.items() if p is None]
    if missing and install:
        apt = _which("apt-get")
        if apt is None or os.geteuid() != 0:
            print(f"missing {', '.join(missing)} and cannot install (needs root and apt-get)")
        else:
            print(f"installing {', '.join(missing)} from Debian packages (apt-get) ...")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            log = tmp / "apt.log"
            with log.open("wb") as out:
                subprocess.run([apt, "update"], stdout=out, stderr=out, env=env, check=False)
                pkgs = ["nginx-light" if n == "nginx" else n for n in missing]
                rc = subprocess.run(
                    [apt, "install", "-y", *pkgs], stdout=out, stderr=out, env=env, check=False
                ).returncode
                if rc != 0 and "nginx-light" in pkgs:
                    pkgs = ["nginx" if p == "nginx-light" else p for p in pkgs]
                    subprocess.run(
                        [apt, "install", "-y", *pkgs], stdout=out, stderr=out, env=env, check=False
                    )
            tools = {name: _which(name) for name in ("nginx", "wrk")}
    missing = [n for n, p in tools.items() if p is None]
    if missing:
        wanted = " ".join("nginx-light (or nginx)" if n == "nginx" else n for n in missing)
        raise BenchError(
            f"missing tool(s): {', '.join(missing)}; install the Debian package(s): {wanted}\n"
            "  e.g. apt-get update && apt-get install -y nginx-light wrk"
        )
    return {n: p for n, p in tools.items() if p is not None}


# --------------------------------------------------------------------------- nginx


def _nginx_head(tmp: Path, name: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {tmp}/{name}-{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}daemon off;\nworker_processes 1;\npid {tmp}/{name}.pid;\n"
        f"error_log {tmp}/{name}-error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        f"{temp}\n"
        "    server_tokens off;\n"
        "    keepalive_requests 1000000;\n"
        "    keepalive_timeout 75s;\n"
    )


def upstream_conf(tmp: Path, port: int) -> str:
    return (
        _nginx_head(tmp, "upstream") + "    access_log off;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} backlog=4096;\n"
        "        location / {\n"
        "            default_type text/plain;\n"
        f'            return 200 "{BODY}";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def nginx_proxy_conf(tmp: Path, port: int, upstream_port: int) -> str:
    """nginx doing what the gateway does, as far as stock nginx can."""
    headers = "\n".join(f'            add_header {n} "{v}" always;' for n, v in SECURITY_HEADERS)
    return (
        _nginx_head(tmp, "nginx")
        + "    log_format main '$remote_addr - $request_id [$time_local] \"$request\" '\n"
        "                    '$status $body_bytes_sent $request_time';\n"
        "    access_log /dev/null main;\n"
        # two policies, like the gateway's route; limits far above what wrk can send
        "    limit_req_zone $binary_remote_addr zone=burst:10m rate=10000000r/s;\n"
        "    limit_req_zone $binary_remote_addr zone=hourly:10m rate=10000000r/s;\n"
        "    upstream backend {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 64;\n"
        "        keepalive_requests 1000000;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} backlog=4096;\n"
        "        location / {\n"
        "            limit_req zone=burst burst=10000000 nodelay;\n"
        "            limit_req zone=hourly burst=10000000 nodelay;\n"
        "            proxy_pass http://backend;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_set_header Host $http_host;\n"
        "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
        "            proxy_set_header X-Forwarded-Proto $scheme;\n"
        "            proxy_set_header X-Forwarded-Host $host;\n"
        "            proxy_set_header X-Real-IP $remote_addr;\n"
        "            proxy_set_header X-Request-ID $request_id;\n"
        "            proxy_hide_header X-Powered-By;\n"
        "            add_header X-Request-ID $request_id always;\n"
        f"{headers}\n"
        "        }\n"
        "    }\n"
        "}\n"
    )


def start_nginx(
    children: Children, nginx: str, name: str, conf: str, *, port: int, cpu: int
) -> Proc:
    tmp = children.tmp
    path = tmp / f"{name}.conf"
    path.write_text(conf)
    argv = [nginx, "-p", str(tmp), "-e", str(tmp / f"{name}-error.log"), "-c", str(path)]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise BenchError(f"nginx config for {name} rejected:\n{check.stderr}")
    return children.spawn(name, argv, cpu=cpu, port=port)


# --------------------------------------------------------------------------- gateway


def gateway_config(
    tmp: Path,
    name: str,
    *,
    port: int,
    admin_port: int,
    up_port: int,
    backend: str,
    jwks: Path,
    bench_dir: Path = BENCH,
) -> Path:
    """The bench config with this run's ports, backend and JWKS file (``jwks``)."""
    import yaml  # noqa: PLC0415 - a dependency of the gateway, present in its venv
    from bench_identity import fill_config  # noqa: PLC0415 - beside this script

    cfg: dict[str, Any] = yaml.safe_load((bench_dir / "gateway-memory.yaml").read_text())
    if (cfg.get("identity") or {}).get("jwt") is not None:
        fill_config(cfg, jwks)
    cfg["listen"]["port"] = port
    cfg["admin"]["port"] = admin_port
    cfg["upstreams"]["api"]["url"] = f"http://127.0.0.1:{up_port}"
    cfg["rate_limit"]["backend"] = backend
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def gateway_env(source: Path | None, redis_url: str | None) -> dict[str, str]:
    """The environment of a gateway process (or the floor's) running ``source``'s package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONUNBUFFERED"] = "1"  # as in the Dockerfile: stdout unbuffered, like production
    if redis_url:
        env["GATEWAY_REDIS_URL"] = redis_url
    if source is not None:
        env["PYTHONPATH"] = str(source)
        # inprocess.py (which the floor imports) puts this, else this checkout, first on
        # sys.path, ahead of PYTHONPATH
        env["BENCH_GATEWAY_SOURCE"] = str(source)
    return env


def spawn_gateway(
    children: Children,
    name: str,
    config: Path,
    *,
    port: int,
    cpu: int,
    redis_url: str | None,
    source: Path | None = None,
    script: list[str] | None = None,
) -> Proc:
    """``source``: another checkout whose ``gateway`` package runs instead of this one
    (an A/B in one run; its dependencies are this virtualenv's). ``script``: a script and
    its arguments to run instead of ``gateway serve --config config`` (the floor)."""
    env = gateway_env(source, redis_url)
    # -P: `python -m` would put the working directory (this checkout) first on sys.path,
    # ahead of PYTHONPATH, and run this checkout's package whatever `source` says
    found = subprocess.run(
        [sys.executable, "-P", "-c", "import gateway; print(gateway.__file__)"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    expected = (source or ROOT) / "gateway"
    if not found or not Path(found).is_relative_to(expected):
        raise BenchError(f"{name}: the gateway package imported is {found!r}, not {expected}'s")
    argv = [sys.executable, "-P", *(script or ["-m", "gateway", "serve", "--config", str(config)])]
    return children.spawn(name, argv, cpu=cpu, port=port, env=env)


def build_source(checkout: Path, build: str, out: Path) -> Path | None:
    """What runs for ``checkout`` in ``build``: None (this checkout as installed), or a
    compiled copy made in ``out`` (bench/compiled.py), built once per directory."""
    if build == "pure":
        return None if checkout == BENCH.parent else checkout
    if (out / "gateway").is_dir():
        return out
    from compiled import compiled_copy  # noqa: PLC0415 - beside this script

    print(f"building {checkout} compiled in {out} (~1 min)", file=sys.stderr)
    try:
        return compiled_copy(checkout, out)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def scrape_metric(admin_port: int, metric: str) -> float | None:
    """Sum of every sample of ``metric`` on the admin port's /metrics, or None."""
    try:
        status, _, body = http_get(admin_port, "/metrics")
    except (OSError, http.client.HTTPException):
        return None
    if status != 200:
        return None
    total = None
    for line in body.decode().splitlines():
        if line.startswith(metric) and line[len(metric)] in " {":
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- wrk


def nan_or(value: float) -> bool:
    """True for a real number (not NaN)."""
    return not math.isnan(value)


def cpu_busy() -> dict[int, float]:
    """Busy seconds of each CPU since boot (everything but idle and iowait)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            f = line.split()
            ticks = [int(x) for x in f[1:]]
            out[int(f[0][3:])] = (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK
    return out


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_us: float
    p99_us: float
    errors: int  # non-2xx/3xx answers plus socket errors
    cpu_s: float = 0.0  # the proxy's CPU over the run
    foreign: float = 0.0  # other processes' share of the proxy CPU over the run (0..1)

    @property
    def cpu_us_per_req(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")


_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _to_us(value: str, unit: str) -> float:
    return float(value) * _UNIT_US[unit]


def parse_wrk(text: str) -> WrkResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m is None or rps is None:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    pct = {
        p: _to_us(v, u)
        for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    }
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_to_us(m.group(2), m.group(3)) / 1e6,
        rps=float(rps.group(1)),
        p50_us=pct.get("50", float("nan")),
        p99_us=pct.get("99", float("nan")),
        errors=errors,
    )


class Wrk:
    """wrk pinned to the load CPU; every run it starts is killed on the way out."""

    running: ClassVar[set[subprocess.Popen[str]]] = set()

    def __init__(self, wrk: str, cpu: int, proxy_cpu: int, headers: Sequence[str] = ()) -> None:
        self.wrk = wrk
        self.cpu = cpu
        self.proxy_cpu = proxy_cpu
        self.headers = list(headers)  # sent with every request, to every target

    def start(
        self, url: str, conns: int, duration: float, script: Path | None = None
    ) -> subprocess.Popen[str]:
        argv = [self.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency"]
        for h in self.headers:
            argv += ["-H", h]
        if script is not None:
            argv += ["-s", str(script)]
        popen = subprocess.Popen(
            [*argv, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=_child_setup(self.cpu),  # noqa: PLW1509 - no threads exist here
        )
        Wrk.running.add(popen)
        return popen

    @staticmethod
    def kill_all() -> None:
        for popen in list(Wrk.running):
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            with contextlib.suppress(Exception):
                popen.communicate(timeout=5)
        Wrk.running.clear()

    @staticmethod
    def finish(popen: subprocess.Popen[str], duration: float) -> WrkResult:
        try:
            out, _ = popen.communicate(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.communicate()
            raise BenchError("wrk did not finish in time") from None
        finally:
            Wrk.running.discard(popen)
        return parse_wrk(out)

    def run(self, url: str, conns: int, duration: float, proc: Proc | None = None) -> WrkResult:
        """One wrk run; with ``proc``, also its CPU and the foreign load on its CPU."""
        cpu0 = proc.cpu_seconds() if proc is not None else 0.0
        busy0, t0 = cpu_busy(), time.monotonic()
        result = self.finish(self.start(url, conns, duration), duration)
        busy1, t1 = cpu_busy(), time.monotonic()
        if proc is not None:
            result.cpu_s = proc.cpu_seconds() - cpu0
            on_cpu = busy1[self.proxy_cpu] - busy0[self.proxy_cpu]
            result.foreign = max(0.0, (on_cpu - result.cpu_s) / (t1 - t0))
        return result


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    key: str
    what: str
    proc: Proc
    admin_port: int | None = None
    saturated: list[WrkResult] = field(default_factory=list)
    single: list[WrkResult] = field(default_factory=list)  # c=1, proxy on its own CPU
    single_one_cpu: list[WrkResult] = field(default_factory=list)  # c=1, all on one CPU
    rss_mib: float = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}{PATH}"

    @staticmethod
    def med(values: list[float]) -> float:
        clean = [v for v in values if nan_or(v)]
        return statistics.median(clean) if clean else float("nan")

    @property
    def rps(self) -> float:
        return self.med([r.rps for r in self.saturated])

    @property
    def cpu_us(self) -> float:
        return self.med([r.cpu_us_per_req for r in self.saturated])

    @property
    def per_cpu_s(self) -> float:
        cpu = self.cpu_us
        return 1e6 / cpu if cpu and nan_or(cpu) else float("nan")

    @property
    def p50_us(self) -> float:
        return self.med([r.p50_us for r in self.saturated])

    @property
    def p99_us(self) -> float:
        return self.med([r.p99_us for r in self.saturated])

    @property
    def c1_p50_us(self) -> float:
        return self.med([r.p50_us for r in self.single])

    @property
    def c1_one_cpu_p50_us(self) -> float:
        return self.med([r.p50_us for r in self.single_one_cpu])

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.saturated + self.single + self.single_one_cpu)

    @property
    def foreign(self) -> float:
        return max((r.foreign for r in self.saturated), default=0.0)


def rotations(items: list[Target], rounds: int) -> Iterator[tuple[int, list[Target]]]:
    """Round-robin, the starting target moving by one each round."""
    for i in range(rounds):
        k = i % len(items)
        yield i, items[k:] + items[:k]


def check_answer(t: Target) -> None:
    """The target proxies correctly: 200, the upstream's body, headers where due."""
    status, headers, body = http_get(t.proc.port, PATH)
    if status != 200 or body.decode() != BODY:
        raise BenchError(f"{t.key}: GET {PATH} answered {status} with {len(body)} bytes")
    if t.admin_port is not None and "x-content-type-options" not in headers:
        raise BenchError(f"{t.key}: no security headers on the response")


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp  # noqa: PLC0415 - the venv's, as the proxies use it

    info = {
        "nproc": str(os.cpu_count()),
        "CPU": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }
    idle = cpuidle()
    if idle:
        info["cpuidle"] = idle
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        info["uvloop"] = str(getattr(uvloop, "__version__", "?"))
    return info


def cpuidle() -> str:
    """The idle driver, and on a KVM guest its halt polling: with ``guest_halt_poll_ns 0``
    an idle vCPU halts at once, and every wake-up is a round trip through the host (it
    weighs on the c=1 figures with two CPUs)."""
    base = Path("/sys/devices/system/cpu/cpuidle")
    try:
        driver = (base / "current_driver").read_text().strip()
    except OSError:
        return ""
    with contextlib.suppress(OSError):
        driver += ", governor " + (base / "current_governor_ro").read_text().strip()
    if driver.startswith("haltpoll"):
        with contextlib.suppress(OSError):
            ns = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
            driver += f", guest_halt_poll_ns {ns}"
    return driver


def tool_versions(tools: dict[str, str]) -> dict[str, str]:
    nginx = subprocess.run([tools["nginx"], "-v"], capture_output=True, text=True, check=False)
    wrk = subprocess.run([tools["wrk"], "--version"], capture_output=True, text=True, check=False)
    first = (wrk.stdout or wrk.stderr or "wrk ?").splitlines()[0]
    return {
        "nginx": (nginx.stderr or nginx.stdout).strip().split("/")[-1],
        "wrk": first.split(" [")[0].removeprefix("wrk "),
    }


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}" if nan_or(value) else "-"


def ratio(a: float, b: float) -> float:
    return a / b if b and nan_or(a) and nan_or(b) else float("nan")


INFO = "info"  # a row that is reported, not judged


AB_TOLERANCE = 0.03
"""An A/B (``--base``) whose change costs more than this against nginx needs a reason."""


def verdict(ok: bool | str | None) -> str:
    if isinstance(ok, str):
        return ok
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def paired_ratio(a: Target, b: Target) -> float:
    """The median over rounds of a's req/s over b's in the same round."""
    rounds = zip(a.saturated, b.saturated, strict=False)  # a target may have lost a round
    pairs = [x.rps / y.rps for x, y in rounds if y.rps > 0]
    return statistics.median(pairs) if pairs else float("nan")


def at_least(value: float, want: float) -> bool | None:
    return value >= want if nan_or(value) else None


def at_most(value: float, want: float) -> bool | None:
    return value <= want if nan_or(value) else None


@dataclass
class Extra:
    readyz: WrkResult | None = None
    readyz_load: WrkResult | None = None
    cold_starts: list[float] = field(default_factory=list)
    direct_c1: list[WrkResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def table(targets: list[Target], direct_p50: float) -> list[str]:
    by = {t.key: t for t in targets}
    nginx, naive = by.get("nginx"), by.get("naive")
    lines = [
        (
            "| target | req/s | CPU µs/req | req per CPU-s | p50 ms | p99 ms | c=1 p50 µs "
            "| c=1 added p50 µs, two CPUs | c=1 added p50 µs, one CPU | RSS MiB | errors "
            "| x nginx (req/CPU-s) | x naive (req/CPU-s) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| upstream (direct) | - | - | - | - | - | {fmt(direct_p50, 1)} | 0 | 0 | - | - | - | - |",
    ]
    for t in targets:
        vs_nginx = ratio(t.per_cpu_s, nginx.per_cpu_s) if nginx else float("nan")
        vs_naive = ratio(t.per_cpu_s, naive.per_cpu_s) if naive else float("nan")
        lines.append(
            f"| {t.key} | {fmt(t.rps)} | {fmt(t.cpu_us, 1)} | {fmt(t.per_cpu_s)} "
            f"| {fmt(t.p50_us / 1e3, 2)} | {fmt(t.p99_us / 1e3, 2)} | {fmt(t.c1_p50_us, 1)} "
            f"| {fmt(t.c1_p50_us - direct_p50, 1)} | {fmt(t.c1_one_cpu_p50_us - direct_p50, 1)} "
            f"| {fmt(t.rss_mib, 1)} | {t.errors} | {fmt(vs_nginx, 3)} | {fmt(vs_naive, 2)} |"
        )
    return lines


def checks(targets: list[Target], extra: Extra, direct_p50: float) -> list[str]:
    by = {t.key: t for t in targets}
    nginx, naive, mem, red = (by.get(k) for k in ("nginx", "naive", "gw-memory", "gw-redis"))
    rows: list[tuple[str, str, str, bool | str | None]] = []
    base = by.get("gw-base")
    if base is not None and mem is not None and nginx is not None:
        a, b = ratio(mem.per_cpu_s, nginx.per_cpu_s), ratio(base.per_cpu_s, nginx.per_cpu_s)
        change = ratio(a, b) - 1
        rows.append(
            (
                "A/B: gw-memory vs gw-base, x nginx (req per CPU-s)",
                f"within {AB_TOLERANCE:.0%}",
                (
                    f"{fmt(a, 3)}x vs {fmt(b, 3)}x ({change:+.1%}; paired req/s"
                    f" {fmt(paired_ratio(mem, base), 3)}x)"
                ),
                at_least(change, -AB_TOLERANCE),
            )
        )
    if mem is not None and nginx is not None:
        r = ratio(mem.per_cpu_s, nginx.per_cpu_s)
        rows.append(
            ("gw-memory vs nginx, req per CPU-s", f">= {TARGET_VS_NGINX}x", f"{fmt(r, 3)}x",
             at_least(r, TARGET_VS_NGINX))
        )  # fmt: skip
    if mem is not None and naive is not None:
        r = ratio(mem.per_cpu_s, naive.per_cpu_s)
        rows.append(
            ("gw-memory vs naive, req per CPU-s", f">= {TARGET_VS_NAIVE}x", f"{fmt(r, 2)}x",
             at_least(r, TARGET_VS_NAIVE))
        )  # fmt: skip
    if mem is not None and red is not None:
        # paired: the two ran next to each other in each round, so the machine's drift
        # between rounds (other tenants of a VM's host) cancels out of each ratio
        r = paired_ratio(red, mem)
        medians = ratio(red.rps, mem.rps)
        per_cpu = ratio(red.per_cpu_s, mem.per_cpu_s)
        got = (
            f"{fmt(r, 3)}x (median of {len(red.saturated)} rounds, each paired; ratio of "
            f"the medians {fmt(medians, 3)}x; req per CPU-s {fmt(per_cpu, 3)}x)"
        )
        rows.append(
            ("gw-redis vs gw-memory, req/s", f">= {TARGET_REDIS_VS_MEMORY}x", got,
             at_least(r, TARGET_REDIS_VS_MEMORY))
        )  # fmt: skip
    elif mem is not None:
        rows.append(("gw-redis vs gw-memory, req/s", "", "skipped", None))
    gw_floor = by.get("gw-floor")
    if gw_floor is not None and mem is not None:
        r = ratio(mem.per_cpu_s, gw_floor.per_cpu_s)
        rows.append(
            ("gw-memory vs gw-floor, req per CPU-s", "reported",
             f"{fmt(r, 3)}x (gw-floor: {fmt(ratio(gw_floor.per_cpu_s, nginx.per_cpu_s), 3)}x"
             " nginx)" if nginx is not None else f"{fmt(r, 3)}x", INFO)
        )  # fmt: skip
    floor = (nginx.c1_p50_us - direct_p50) if nginx is not None else float("nan")
    floor_one = (nginx.c1_one_cpu_p50_us - direct_p50) if nginx is not None else float("nan")
    for t in (mem, red, gw_floor):
        if t is not None:
            # judged where the proxy shares the direct run's placement (one CPU); with a
            # CPU of its own, four crossings between CPUs are added that the direct run
            # does not make: reported beside nginx's figure there, not judged. Judged for
            # the memory backend: the redis one adds a round trip to another process that
            # nginx's limit_req does not make, and the floor is there to compare with
            added = t.c1_one_cpu_p50_us - direct_p50
            want = f"<= {TARGET_ADDED_VS_NGINX:g}x nginx's" if t is mem else "reported"
            ok: bool | str | None = INFO
            if t is mem:
                limit = TARGET_ADDED_VS_NGINX * floor_one
                ok = at_most(added, limit) if nan_or(floor_one) else None
            got = (
                f"{fmt(added, 1)} µs (nginx: {fmt(floor_one, 1)} µs; "
                f"{fmt(ratio(added, floor_one), 2)}x)"
            )
            rows.append((f"{t.key} c=1 added p50, one CPU", want, got, ok))
            added = t.c1_p50_us - direct_p50
            got = (
                f"{fmt(added, 1)} µs (nginx: {fmt(floor, 1)} µs; gateway - nginx "
                f"{fmt(added - floor, 1)} µs)"
            )
            rows.append((f"{t.key} c=1 added p50, two CPUs", "reported", got, INFO))
    rz = extra.readyz
    if rz is not None:
        p99 = rz.p99_us / 1e3
        load = extra.readyz_load
        got = (
            f"{fmt(p99, 2)} ms (p50 {fmt(rz.p50_us / 1e3, 2)} ms, {rz.requests} probes, "
            f"{rz.errors} errors; load {fmt(load.rps if load else float('nan'))} req/s)"
        )
        ok = at_most(p99, TARGET_READYZ_P99_MS)
        rows.append(
            ("/readyz p99 while gw-memory is saturated", f"<= {TARGET_READYZ_P99_MS:.0f} ms",
             got, ok and rz.errors == 0)
        )  # fmt: skip
    if extra.cold_starts:
        med = statistics.median(extra.cold_starts)
        runs = ", ".join(f"{s:.3f}" for s in extra.cold_starts)
        rows.append(
            ("cold start: spawn to /readyz 200 (median)", f"<= {TARGET_COLD_START_S:.0f} s",
             f"{med:.3f} s (runs: {runs})", med <= TARGET_COLD_START_S)
        )  # fmt: skip
    lines = ["| check | target | measured | result |", "|---|---|---|---|"]
    lines += [f"| {name} | {want} | {got} | {verdict(ok)} |" for name, want, got, ok in rows]
    return lines


def report(
    targets: list[Target], extra: Extra, info: dict[str, str], settings: dict[str, str]
) -> str:
    direct_p50 = Target.med([r.p50_us for r in extra.direct_c1])
    lines = ["# Gateway benchmark", ""]
    lines += ["Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), ""]
    lines += ["Settings: " + "; ".join(f"{k} {v}" for k, v in settings.items()), ""]
    lines += [*table(targets, direct_p50), ""]
    lines += ["Targets: " + "; ".join(f"{t.key} = {t.what}" for t in targets) + ".", ""]
    lines += [*checks(targets, extra, direct_p50), ""]
    if extra.notes:
        lines += ["Notes:", "", *(f"- {n}" for n in extra.notes), ""]
    lines += [
        "Rounds (c=50: req/s, CPU µs/req, p50/p99 ms; c=1: p50 µs, two CPUs / one CPU):",
        "",
    ]
    for t in targets:
        sat = "; ".join(
            f"{r.rps:,.0f} {r.cpu_us_per_req:.1f} {r.p50_us / 1e3:.2f}/{r.p99_us / 1e3:.2f}"
            for r in t.saturated
        )
        two = ", ".join(f"{r.p50_us:.0f}" for r in t.single)
        one = ", ".join(f"{r.p50_us:.0f}" for r in t.single_one_cpu)
        lines.append(f"- {t.key}: c=50 [{sat}]; c=1 [{two}] / [{one}]")
    if extra.direct_c1:
        direct = ", ".join(f"{r.p50_us:.0f}" for r in extra.direct_c1)
        lines.append(f"- upstream direct: c=1 [{direct}]")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the gateway against nginx and a naive aiohttp proxy (loopback)."
    )
    p.add_argument("--quick", action="store_true", help="one short round of everything (~1 min)")
    p.add_argument(
        "--duration", type=float, help="seconds per saturating wrk round (default 8, quick 4)"
    )
    p.add_argument("--rounds", type=int, help="rounds per target (default 3, quick 1)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections when saturating")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("GATEWAY_REDIS_URL"),
        help="an existing Redis for the gw-redis variant (default $GATEWAY_REDIS_URL; when"
        " neither is set, a private redis-server pinned to the load CPU, else"
        f" {DEFAULT_REDIS_URL})",
    )
    p.add_argument("--skip-redis", action="store_true", help="leave out the redis variant")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--out", type=Path, default=BENCH / "results.md", help="markdown report path")
    p.add_argument(
        "--base",
        type=Path,
        help="another checkout of the gateway (e.g. a `git worktree` of an older commit) to run"
        " beside gw-memory as gw-base, rounds interleaved: an A/B of two commits in one run",
    )
    p.add_argument(
        "--build",
        choices=("compiled", "pure"),
        default="compiled",
        help="the gateway's build for gw-memory and gw-redis: compiled as the image builds it"
        " (bench/compiled.py, ~1 min; the default) or this checkout's pure Python",
    )
    p.add_argument(
        "--base-build",
        choices=("compiled", "pure"),
        help="the build of --base (default: --build's; pure for a checkout without setup.py)",
    )
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (4.0 if args.quick else 8.0)
    args.c1_duration = max(2.0, args.duration / 2)
    args.warmup = 1.0 if args.quick else 6.0
    args.cold_runs = 1 if args.quick else 3
    return args


def cpus() -> tuple[int, int]:
    """(load CPU, proxy CPU): CPU 0 and CPU 1 on a 2-core machine."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1]


def redis_reachable(url: str) -> bool:
    m = re.match(r"redis://(?:[^@/]*@)?([^:/]+)(?::(\d+))?", url)
    if m is None:
        return False
    try:
        with socket.create_connection((m.group(1), int(m.group(2) or 6379)), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(children: Children, *, cpu: int) -> tuple[str, Proc | None]:
    """A private redis-server on the load CPU (like the upstream), or the default URL."""
    server = _which("redis-server")
    if server is None:
        return DEFAULT_REDIS_URL, None
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--daemonize", "no"]  # fmt: skip
    proc = children.spawn("redis", argv, cpu=cpu, port=port)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 5
    while not redis_reachable(url):
        if time.monotonic() > deadline or not proc.alive():
            children.stop(proc)
            return DEFAULT_REDIS_URL, None
        time.sleep(0.05)
    return url, proc


def redis_server_pid(url: str) -> int | None:
    """The local redis-server's pid (for its CPU per request), if it can be read."""
    cli = _which("redis-cli")
    if cli is None:
        return None
    out = subprocess.run(
        [cli, "-u", url, "info", "server"], capture_output=True, text=True, check=False
    )
    m = re.search(r"process_id:(\d+)", out.stdout)
    return int(m.group(1)) if m and Path(f"/proc/{m.group(1)}").exists() else None


def pid_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError):
        f = _stat_fields(pid)
        return (int(f[11]) + int(f[12])) / CLK_TCK
    return 0.0


def quiet_check(extra: Extra) -> None:
    """Warn when other processes already load the machine: the numbers would suffer."""
    busy0, t0 = cpu_busy(), time.monotonic()
    time.sleep(1.0)
    busy1, t1 = cpu_busy(), time.monotonic()
    loads = {cpu: (busy1[cpu] - busy0[cpu]) / (t1 - t0) for cpu in busy0}
    if max(loads.values()) > 0.1:
        text = ", ".join(f"CPU {c} {v:.0%}" for c, v in sorted(loads.items()))
        msg = f"the machine was busy before the run ({text}): numbers are not reliable"
        print(f"warning: {msg}")
        extra.notes.append(msg)


def start_targets(
    args: argparse.Namespace,
    children: Children,
    tools: dict[str, str],
    extra: Extra,
    *,
    up_port: int,
    proxy_cpu: int,
) -> list[Target]:
    tmp = children.tmp
    targets: list[Target] = []

    port = free_port()
    conf = nginx_proxy_conf(tmp, port, up_port)
    proc = start_nginx(children, tools["nginx"], "nginx", conf, port=port, cpu=proxy_cpu)
    what = "nginx reverse proxy (limit_req x2, 6 security headers, keep-alive upstream)"
    targets.append(Target("nginx", what, proc))

    port = free_port()
    argv = [sys.executable, str(BENCH / "naive_proxy.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{up_port}"]  # fmt: skip
    proc = children.spawn("naive", argv, cpu=proxy_cpu, port=port)
    targets.append(Target("naive", "bench/naive_proxy.py (aiohttp + uvloop, streaming)", proc))

    port, admin = free_port(), free_port()
    cfg = gateway_config(
        tmp,
        "gw-memory",
        port=port,
        admin_port=admin,
        up_port=up_port,
        backend="memory",
        jwks=args.jwks,
    )
    own = build_source(BENCH.parent, args.build, tmp / "compiled-own")
    proc = spawn_gateway(
        children, "gw-memory", cfg, port=port, cpu=proxy_cpu, redis_url=None, source=own
    )
    what = f"the gateway ({args.build}), full pipeline, memory backend"
    targets.append(Target("gw-memory", what, proc, admin))

    # the design's floor: the same server and upstream pool, a handler that only forwards
    port = free_port()
    script = [str(BENCH / "floor_server.py"), "--port", str(port),
              "--upstream", f"http://127.0.0.1:{up_port}"]  # fmt: skip
    proc = spawn_gateway(
        children, "gw-floor", cfg, port=port, cpu=proxy_cpu, redis_url=None, source=own,
        script=script,
    )  # fmt: skip
    what = (
        f"bench/floor_server.py ({args.build}): the gateway's server and upstream pool, "
        "forwarding only (the floor)"
    )
    targets.append(Target("gw-floor", what, proc))

    if args.base is not None:  # the same, from another checkout (its own bench config)
        port, admin = free_port(), free_port()
        base = args.base.resolve()
        cfg = gateway_config(
            tmp,
            "gw-base",
            port=port,
            admin_port=admin,
            up_port=up_port,
            backend="memory",
            jwks=args.jwks,
            bench_dir=base / "bench",
        )
        base_build = args.base_build or (args.build if (base / "setup.py").exists() else "pure")
        source = build_source(base, base_build, tmp / "compiled-base") or base
        proc = spawn_gateway(
            children, "gw-base", cfg, port=port, cpu=proxy_cpu, redis_url=None, source=source
        )
        what = f"the gateway of {base} ({base_build}), full pipeline, memory backend (A/B base)"
        targets.append(Target("gw-base", what, proc, admin))

    if not args.skip_redis and args.redis_url is None:
        args.redis_url, args.redis_proc = start_redis(children, cpu=cpus()[0])
    if args.skip_redis:
        extra.notes.append("gw-redis skipped (--skip-redis)")
    elif not redis_reachable(args.redis_url):
        extra.notes.append(f"gw-redis skipped: no Redis answers at {args.redis_url}")
    else:
        port, admin = free_port(), free_port()
        cfg = gateway_config(
            tmp,
            "gw-redis",
            port=port,
            admin_port=admin,
            up_port=up_port,
            backend="redis",
            jwks=args.jwks,
        )
        proc = spawn_gateway(
            children, "gw-redis", cfg, port=port, cpu=proxy_cpu, redis_url=args.redis_url,
            source=own,
        )  # fmt: skip
        what = f"the gateway ({args.build}), full pipeline, redis backend"
        targets.append(Target("gw-redis", what, proc, admin))

    for t in list(targets):
        try:
            wait_http(t.proc, t.proc.port, "/readyz" if t.admin_port else PATH, 20)
            check_answer(t)
        except BenchError as exc:
            if t.key != "gw-redis":
                raise
            extra.notes.append(f"gw-redis skipped: the redis backend did not start: {exc}")
            print(f"skipping gw-redis: {exc}")
            targets.remove(t)
            children.stop(t.proc)
    return targets


def measure(
    args: argparse.Namespace, wrk: Wrk, targets: list[Target], direct: Target, extra: Extra
) -> None:
    for t in targets:  # warm-up, not counted: pools, caches, the interpreter's specialisation
        wrk.run(t.url, args.connections, args.warmup)

    red = next((t for t in targets if t.key == "gw-redis"), None)
    private = getattr(args, "redis_proc", None)
    redis_pid = (private.pid if private else redis_server_pid(args.redis_url)) if red else None
    redis_cpu, redis_reqs = 0.0, 0
    print(
        f"saturating rounds: {args.rounds} x {len(targets)} targets x {args.duration:.0f} s, "
        f"c={args.connections}"
    )
    for i, order in rotations(targets, args.rounds):
        for t in order:
            r0 = pid_cpu(redis_pid) if t is red else 0.0
            res = wrk.run(t.url, args.connections, args.duration, t.proc)
            if t is red:
                redis_cpu += pid_cpu(redis_pid) - r0
                redis_reqs += res.requests
            t.saturated.append(res)
            print(
                f"  round {i + 1} {t.key:10s} {res.rps:9,.0f} req/s {res.cpu_us_per_req:7.1f} "
                f"µs CPU/req  p50 {res.p50_us / 1e3:6.2f} ms  p99 {res.p99_us / 1e3:6.2f} ms  "
                f"errors {res.errors}  other load on its CPU {res.foreign:.0%}"
            )
    if redis_pid and redis_reqs:
        extra.notes.append(
            f"redis-server (pid {redis_pid}, "
            f"{'private, on the load CPU' if private else 'not pinned'}) used "
            f"{redis_cpu / redis_reqs * 1e6:.1f} µs CPU per gw-redis request, "
            "on top of the gateway's own (not in the table)"
        )

    print(
        f"c=1 rounds: {args.rounds} x ({len(targets)} x 2 placements + direct) "
        f"x {args.c1_duration:.0f} s"
    )
    for i, order in rotations([direct, *targets], args.rounds):
        for t in order:
            if t is direct:  # wrk and the upstream share the load CPU already
                res = wrk.run(t.url, 1, args.c1_duration)
                extra.direct_c1.append(res)
                print(f"  round {i + 1} {t.key:10s} c=1 p50 {res.p50_us:8.1f} µs")
                continue
            if i % 2 == 0:  # the order of the two placements alternates with the rounds
                res = wrk.run(t.url, 1, args.c1_duration)
            with t.proc.moved_to(wrk.cpu):  # the proxy joins wrk and the upstream
                one = wrk.run(t.url, 1, args.c1_duration)
            if i % 2 == 1:
                res = wrk.run(t.url, 1, args.c1_duration)
            t.single.append(res)
            t.single_one_cpu.append(one)
            print(
                f"  round {i + 1} {t.key:10s} c=1 p50 {res.p50_us:8.1f} µs (two CPUs), "
                f"{one.p50_us:8.1f} µs (one CPU)"
            )


def measure_readyz(args: argparse.Namespace, wrk: Wrk, mem: Target, extra: Extra) -> None:
    """/readyz at ~20 req/s (bench/readyz.lua) while wrk saturates the gateway."""
    print(f"/readyz under load: {args.duration:.0f} s saturating gw-memory, probing ~20 req/s")
    load = wrk.start(mem.url, args.connections, args.duration)
    time.sleep(0.3)
    url = f"http://127.0.0.1:{mem.proc.port}/readyz"
    probe = wrk.start(url, 1, args.duration - 0.6, BENCH / "readyz.lua")
    rz = extra.readyz = Wrk.finish(probe, args.duration)
    extra.readyz_load = Wrk.finish(load, args.duration)
    print(
        f"  /readyz p50 {rz.p50_us / 1e3:.2f} ms p99 {rz.p99_us / 1e3:.2f} ms over "
        f"{rz.requests} probes; load {extra.readyz_load.rps:,.0f} req/s"
    )


def measure_cold_start(
    args: argparse.Namespace, children: Children, up_port: int, proxy_cpu: int, extra: Extra
) -> None:
    print(f"cold start: {args.cold_runs} run(s)")
    for n in range(args.cold_runs):
        port, admin = free_port(), free_port()
        cfg = gateway_config(
            children.tmp,
            f"gw-cold{n}",
            port=port,
            admin_port=admin,
            up_port=up_port,
            backend="memory",
            jwks=args.jwks,
        )
        t0 = time.monotonic()
        proc = spawn_gateway(
            children, f"gw-cold{n}", cfg, port=port, cpu=proxy_cpu, redis_url=None,
            source=build_source(BENCH.parent, args.build, children.tmp / "compiled-own"),
        )  # fmt: skip
        wait_http(proc, port, "/readyz", 20)
        extra.cold_starts.append(time.monotonic() - t0)
        children.stop(proc)
        print(f"  {extra.cold_starts[-1]:.3f} s")


def after_run_notes(targets: list[Target], extra: Extra) -> None:
    for t in targets:
        t.rss_mib = t.proc.rss_mib()
        if t.admin_port is not None:
            errs = scrape_metric(t.admin_port, "gateway_ratelimit_backend_errors_total")
            if errs:
                extra.notes.append(f"{t.key}: {errs:.0f} rate-limit backend errors (fell back)")
            bans = scrape_metric(t.admin_port, "gateway_bans_total")
            if bans:
                extra.notes.append(f"{t.key}: {bans:.0f} bans during the run: results invalid")
    if any(t.errors for t in targets):
        extra.notes.append(
            "errors = non-2xx answers + socket errors seen by wrk: a round with any is suspect"
        )
    worst = max(targets, key=lambda t: t.foreign)
    if worst.foreign > 0.05:
        extra.notes.append(
            f"other processes used up to {worst.foreign:.0%} of the proxy CPU during a round "
            f"({worst.key}): the machine was not quiet, numbers are not reliable"
        )
    extra.notes.append(
        "nginx's req/s is bounded by the load CPU (wrk + upstream share it), not by nginx: "
        "compare CPU per request, measured on each proxy alone"
    )
    extra.notes.append(
        "c=1 added p50, two CPUs: the proxy on its own CPU, so each request crosses CPUs "
        "four times (wrk -> proxy -> upstream and back) where the direct run crosses none; "
        "on a VM each crossing wakes an idle vCPU, and nginx's figure is this placement's "
        "floor (reported, not judged). One CPU: wrk, proxy and upstream share the load "
        "CPU, as direct does: what the proxy's own work adds (judged)"
    )


def run(args: argparse.Namespace, tmp: Path, children: Children) -> int:
    tools = ensure_tools(tmp, install=not args.no_install)
    load_cpu, proxy_cpu = cpus()
    os.sched_setaffinity(0, {load_cpu})  # this script stays off the proxy's CPU
    if load_cpu == proxy_cpu:
        print("warning: one CPU only: load and proxies share it; numbers are not comparable")
    extra = Extra()
    started = time.monotonic()
    quiet_check(extra)

    from bench_identity import make_identity  # noqa: PLC0415 - beside this script

    # every request carries the same valid token (the identity policy's key)
    args.jwks, token = make_identity(tmp)
    up_port = free_port()
    conf = upstream_conf(tmp, up_port)
    upstream = start_nginx(children, tools["nginx"], "upstream", conf, port=up_port, cpu=load_cpu)
    wait_http(upstream, up_port, "/", 10)
    targets = start_targets(args, children, tools, extra, up_port=up_port, proxy_cpu=proxy_cpu)
    ports = ", ".join(f"{t.key} :{t.proc.port} (pid {t.proc.pid})" for t in targets)
    print(f"started: upstream :{up_port}, {ports}")
    print(f"CPUs: proxies on {proxy_cpu}; wrk, upstream and this script on {load_cpu}")

    wrk = Wrk(tools["wrk"], load_cpu, proxy_cpu, [f"Authorization: Bearer {token}"])
    measure(args, wrk, targets, Target("direct", "upstream", upstream), extra)
    measure_readyz(args, wrk, next(t for t in targets if t.key == "gw-memory"), extra)
    after_run_notes(targets, extra)
    measure_cold_start(args, children, up_port, proxy_cpu, extra)

    info = machine()
    info.update(tool_versions(tools))
    settings = {
        "rounds": str(args.rounds),
        "c=50 round": f"{args.duration:.0f} s",
        "c=1 round": f"{args.c1_duration:.0f} s",
        "wrk": f"-t1 -c{args.connections} --latency",
        "pinning": f"proxy CPU {proxy_cpu}, wrk + upstream CPU {load_cpu}",
        "upstream": f"nginx return 200 ({len(BODY)}-byte body)",
        "path": PATH,
        "gateway build": args.build,
        "total time": f"{time.monotonic() - started:.0f} s",
    }
    text = report(targets, extra, info, settings)
    print()
    print(text)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    tmp.chmod(0o755)  # nginx workers read their config under it
    children = Children(tmp)
    # Ctrl-C even when started in the background (where SIGINT comes in ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return run(args, tmp, children)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Wrk.kill_all()
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
