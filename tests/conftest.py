"""Shared fixtures: real Redis and PostgreSQL when reachable, a clear skip when not."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_HOST, PG_PORT = "127.0.0.1", 5432


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: the kernel may give the same
    ephemeral port to two binds in a row once the first socket is closed, and a test
    that asks for two ports (listen and admin) must get two."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _reachable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the machine's Redis (database 15 is left to the tests); skip if absent."""
    url = os.environ.get("GATEWAY_TEST_REDIS_URL", f"redis://{REDIS_HOST}:{REDIS_PORT}/0")
    if not _redis_answers(REDIS_HOST, REDIS_PORT):
        pytest.skip(
            f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: start it with "
            "`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' "
            "--appendonly no` (bash .ci/run does this)"
        )
    return url


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """DSN of the machine's PostgreSQL database `test`; skip if absent."""
    dsn = os.environ.get(
        "GATEWAY_TEST_DATABASE_URL", f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"
    )
    if not _reachable(PG_HOST, PG_PORT):
        pytest.skip(
            f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}: start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
            "(bash .ci/run does this)"
        )
    return dsn


class RedisServer:
    """A private redis-server on a free port, for outage and cluster tests."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if _redis_answers("127.0.0.1", self.port):
                return
            time.sleep(0.05)
        self.stop()
        msg = f"redis-server on port {self.port} did not start"
        raise RuntimeError(msg)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, stopped at the end."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 45_000)
        if port not in taken and _bindable(port) and _bindable(port + 10_000):
            taken.add(port)
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A Redis Cluster of three primaries (no replicas) of the test run's own, as a
    ``redis+cluster://`` URL of its first node."""
    cli = shutil.which("redis-cli")
    if cli is None or shutil.which("redis-server") is None:
        pytest.skip("redis-cli / redis-server are not installed: no local Redis Cluster test")
    servers = []
    taken: set[int] = set()
    try:
        for _ in range(3):
            port = cluster_port(taken)
            server = RedisServer(
                port,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                "2000",
            )
            server.start()
            servers.append(server)
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while True:
            states = [
                subprocess.run(
                    [cli, "-p", str(s.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
                for s in servers
            ]
            if all("cluster_state:ok" in st for st in states):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the local Redis Cluster did not reach cluster_state:ok: {states}")
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{servers[0].port}"
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.dir, ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    """``scripts/test-compiled`` sets GATEWAY_EXPECT_COMPILED=1: a run that would test the
    pure package instead (a path mix-up) stops before the first test."""
    if os.environ.get("GATEWAY_EXPECT_COMPILED") == "1":
        import gateway

        if not gateway.compiled():
            pytest.exit(f"expected the compiled build, imported {gateway.__file__}", returncode=3)
