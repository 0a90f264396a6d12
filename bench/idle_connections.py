"""What an idle keep-alive connection on the proxy port costs the gateway in memory.

    .venv/bin/python bench/idle_connections.py [--connections 5000] [--rounds 2]

Starts ``gateway serve`` (``bench/gateway-memory.yaml``, ports filled in, the access log
to /dev/null) and a small keep-alive upstream (threads of this process), then, for each
mode, opens ``--connections`` loopback
connections from this process and reads the gateway's ``VmRSS`` (``/proc/PID/status``)
before, with them open and after they are closed:

* ``connected``: connected, nothing ever sent;
* ``kept-alive probe``: one ``/livez`` served on each (answered by the gateway as the
  head is parsed), then nothing;
* ``kept-alive proxied`` (``--proxied``): one request through the full pipeline to the
  upstream on each, then nothing. Not in the default run: its figures are not trusted
  yet (its first round took minutes, and its second did not finish in one try).

Each mode runs in a fresh gateway. It prints the bytes each connection adds
(open - before) / N and how much of that is given back once they close
((open - after) / (open - before)). The first round is what the connections cost a
process that never had them; the next ones show whether what the closed ones freed is
used again (then they add little).

The file descriptor limit is raised to the hard limit (this process and the gateway it
starts both need one descriptor a connection, and some); fewer connections are opened
when the limit is too low, with a note.
"""

from __future__ import annotations

import argparse
import http.server
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_identity import fill_config, make_identity

BENCH = Path(__file__).resolve().parent
_PROBE = b"GET /livez HTTP/1.1\r\nHost: bench\r\n\r\n"
_PROXIED = b"GET /idle HTTP/1.1\r\nHost: bench\r\n\r\n"
_BODY = b"x" * 200
_SETTLE_S = 1.0  # the gateway's loop accepts and reads what it got before RSS is read


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (inherited by the gateway); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the gateway's pool keeps its connections

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(_BODY)))
        self.end_headers()
        self.wfile.write(_BODY)

    def log_message(self, *_args: object) -> None:
        pass


def start_upstream() -> http.server.ThreadingHTTPServer:
    """A small keep-alive upstream in threads of this process (200, a 200-byte body)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def write_config(tmp: Path, port: int, admin_port: int, up_port: int) -> Path:
    import yaml  # noqa: PLC0415 - a dependency of the gateway, present in its venv

    cfg: dict[str, Any] = yaml.safe_load((BENCH / "gateway-memory.yaml").read_text())
    if (cfg.get("identity") or {}).get("jwt") is not None:
        fill_config(cfg, make_identity(tmp)[0])
    cfg["listen"]["port"] = port
    cfg["admin"]["port"] = admin_port
    cfg["upstreams"]["api"]["url"] = f"http://127.0.0.1:{up_port}"
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def wait_ready(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(_PROBE)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the gateway did not answer /livez")


def read_answer(s: socket.socket) -> None:
    """Read one answer (a probe's: a small head and body, Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += s.recv(4096)


def one_mode(pid: int, port: int, n: int, *, request: bytes | None) -> tuple[int, int, int]:
    """RSS (KiB) before, with ``n`` connections open, after they are closed."""
    time.sleep(_SETTLE_S)
    before = rss_kb(pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            if request is not None:
                s.sendall(request)
                read_answer(s)
            socks.append(s)
        time.sleep(_SETTLE_S)
        opened = rss_kb(pid)
    finally:
        for s in socks:
            s.close()
    time.sleep(2 * _SETTLE_S)
    return before, opened, rss_kb(pid)


def run_gateway(tmp: Path, mode: str, n: int, rounds: int, *, request: bytes | None) -> None:
    """A fresh gateway for a mode: its first round is what connections cost a process
    that never had them, the next ones whether what was freed is used again."""
    port, admin_port = free_port(), free_port()
    upstream = start_upstream()
    config = write_config(tmp, port, admin_port, upstream.server_address[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_ready(port)
        for rnd in range(1, rounds + 1):
            before, opened, after = one_mode(proc.pid, port, n, request=request)
            added = opened - before
            per = added * 1024 / n
            back = (opened - after) / added if added > 0 else float("nan")
            print(
                f"| {mode} | {rnd} | {before} | {opened} | {after} | {per:,.0f} | {back:.0%} |",
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        upstream.shutdown()
        upstream.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2, help="per mode, in the same gateway")
    parser.add_argument(
        "--proxied", action="store_true", help="also the proxied mode (slow; see the docstring)"
    )
    args = parser.parse_args()
    limit = raise_nofile(args.connections + 200)
    n = min(args.connections, limit - 100)
    print(f"RLIMIT_NOFILE soft limit {limit}: {n} connections", flush=True)
    if n < args.connections:
        print(f"note: {args.connections} asked, the fd limit allows {n}")
    print("| mode | round | RSS before (KiB) | open | after | bytes / connection | given back |")
    print("|---|---|---|---|---|---|---|")
    modes: list[tuple[str, bytes | None]] = [("connected", None), ("kept-alive probe", _PROBE)]
    if args.proxied:
        modes.append(("kept-alive proxied", _PROXIED))
    for mode, request in modes:
        with tempfile.TemporaryDirectory() as tmp:
            run_gateway(Path(tmp), mode, n, args.rounds, request=request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
