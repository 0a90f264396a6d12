"""The rate limiter's lean Redis connection (gateway.stores.redis.resp) against real redis-servers:
replies, pipelining, error replies, NOSCRIPT, reconnection, AUTH, SELECT, Unix sockets,
TLS, deadlines against a server that never answers, and uvloop."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis.asyncio import Redis
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.testing import capture_logs

from gateway.core.gcra import Rate
from gateway.metrics import Metrics
from gateway.stores.limiter import Check
from gateway.stores.redis.limiter import RedisLimiter
from gateway.stores.redis.resp import Endpoint, FutureWaiter, RespClient, pack_command
from tests.conftest import RedisServer, free_port
from tests.gw import backend_errors

RATE = Rate(1, 3600.0, 4)


def client_for(url: str, timeout_s: float = 1.0) -> RespClient:
    endpoint = Endpoint.from_url(url)
    assert endpoint is not None
    return RespClient(endpoint, connect_timeout_s=timeout_s)


@pytest.fixture
async def admin(private_redis: RedisServer) -> AsyncIterator[Redis]:
    """A redis-py client of the private server, to look at it from outside."""
    client = Redis.from_url(private_redis.url)
    try:
        yield client
    finally:
        await client.aclose()


class QuietServer:
    """A TCP server that accepts connections and answers with ``reply`` (or never)."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        if self.reply is not None:
            await reader.read(1)
            writer.write(self.reply)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def silent() -> AsyncIterator[QuietServer]:
    server = QuietServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


# ---------------------------------------------------------------- replies


async def test_replies_of_every_type(private_redis: RedisServer) -> None:
    client = client_for(private_redis.url)
    try:
        assert await client.execute("SET", "k", b"v\r\nw", timeout_s=1) == b"OK"
        assert await client.execute("GET", "k", timeout_s=1) == b"v\r\nw"
        assert await client.execute("GET", "missing", timeout_s=1) is None
        assert await client.execute("INCRBY", "n", -7, timeout_s=1) == -7
        nested = await client.execute(
            "EVAL", "return {1, 'two', {3, 'four'}, false}", 0, timeout_s=1
        )
        assert nested == [1, b"two", [3, b"four"], None]
        big = bytes(range(256)) * 8192  # 2 MiB: read in many pieces
        await client.execute("SET", "big", big, timeout_s=2)
        assert await client.execute("GET", "big", timeout_s=2) == big
    finally:
        await client.aclose()


async def test_error_replies_are_raised_and_the_connection_stays_usable(
    private_redis: RedisServer,
) -> None:
    client = client_for(private_redis.url)
    try:
        conn_id = await client.execute("CLIENT", "ID", timeout_s=1)
        await client.execute("SET", "s", "x", timeout_s=1)
        with pytest.raises(ResponseError, match=r"^WRONGTYPE"):
            await client.execute("LPUSH", "s", "y", timeout_s=1)
        with pytest.raises(ResponseError, match="unknown command"):
            await client.execute("NOSUCHCOMMAND", timeout_s=1)
        # an error inside an array is a value, not a failure
        reply = await client.execute(
            "EVAL", "return {1, redis.error_reply('boom')}", 0, timeout_s=1
        )
        assert reply[0] == 1
        assert isinstance(reply[1], ResponseError)
        assert str(reply[1]).endswith("boom")
        assert await client.execute("CLIENT", "ID", timeout_s=1) == conn_id  # same connection
    finally:
        await client.aclose()


async def test_pipelined_commands_are_answered_in_order_on_one_connection(
    private_redis: RedisServer, admin: Redis
) -> None:
    client = client_for(private_redis.url)
    loop = asyncio.get_running_loop()
    try:
        await client.execute("PING", timeout_s=1)
        deadline = loop.time() + 2
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(3000)]
        # 1000 written one by one, 2000 in one write, all before any reply is read
        for future in futures[:1000]:
            client.send(pack_command("INCR", "seq"), FutureWaiter(deadline, future))
        client.send_many(
            pack_command("INCR", "seq") * 2000,
            [FutureWaiter(deadline, f) for f in futures[1000:]],
        )
        assert await asyncio.gather(*futures) == list(range(1, 3001))
        clients = await admin.client_list()
        assert len(clients) == 2  # ours and the admin's
    finally:
        await client.aclose()


# ---------------------------------------------------------------- reconnection


async def test_reconnects_after_the_server_closes_the_connection(
    private_redis: RedisServer, admin: Redis
) -> None:
    client = client_for(private_redis.url)
    try:
        first = await client.execute("CLIENT", "ID", timeout_s=1)
        assert await admin.client_kill_filter(_id=first) == 1
        await asyncio.sleep(0.05)  # the close is seen
        assert not client.connected
        second = await client.execute("CLIENT", "ID", timeout_s=1)
        assert second != first
        # a command waiting when the connection is closed fails at once, then the next works
        blocked = asyncio.ensure_future(client.execute("BLPOP", "nothing", 10, timeout_s=20))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await admin.client_kill_filter(_id=second) == 1
        with pytest.raises(RedisConnectionError, match="lost"):
            await blocked
        assert time.monotonic() - started < 0.5
        assert await client.execute("PING", timeout_s=1) == b"PONG"
    finally:
        await client.aclose()


async def test_reconnects_after_a_restart(private_redis: RedisServer) -> None:
    client = client_for(private_redis.url, timeout_s=1.0)
    try:
        assert await client.execute("PING", timeout_s=1) == b"PONG"
        private_redis.stop()
        with pytest.raises(RedisConnectionError):
            await client.execute("PING", timeout_s=1)
        started = time.monotonic()
        with pytest.raises(RedisConnectionError, match="Error connecting"):
            await client.execute("PING", timeout_s=1)  # refused: fails fast
        assert time.monotonic() - started < 0.5  # well before the 1 s connect timeout
        private_redis.start()
        assert await client.execute("PING", timeout_s=1) == b"PONG"
    finally:
        await client.aclose()


async def test_closed_client_fails_waiting_and_later_commands(silent: QuietServer) -> None:
    client = client_for(f"redis://127.0.0.1:{silent.port}/0")
    waiting = asyncio.ensure_future(client.execute("PING", timeout_s=5))
    await asyncio.sleep(0.05)
    await client.aclose()
    with pytest.raises(RedisConnectionError, match="closed"):
        await waiting
    with pytest.raises(RedisConnectionError, match="closed"):
        await client.execute("PING", timeout_s=1)


# ---------------------------------------------------------------- deadlines


async def test_a_server_that_never_answers_times_out_and_the_next_command_reconnects(
    silent: QuietServer,
) -> None:
    client = client_for(f"redis://127.0.0.1:{silent.port}/0")
    try:
        started = time.monotonic()
        slow = asyncio.ensure_future(client.execute("PING", timeout_s=0.5))
        with pytest.raises(RedisTimeoutError):
            await client.execute("PING", timeout_s=0.1)
        elapsed = time.monotonic() - started
        assert 0.09 <= elapsed < 0.45  # not the slow command's 0.5 s
        # the connection is dropped: everything it held fails with it
        with pytest.raises(RedisTimeoutError):
            await slow
        assert time.monotonic() - started < 0.45
        assert silent.accepted == 1
        with pytest.raises(RedisTimeoutError):
            await client.execute("PING", timeout_s=0.05)
        assert silent.accepted == 2  # a new connection
    finally:
        await client.aclose()


async def test_connect_timeout_bounds_a_connection_that_never_completes() -> None:
    # 192.0.2.0/24 (TEST-NET-1) is never routed: the SYN goes nowhere
    client = RespClient(Endpoint(host="192.0.2.1", port=6379), connect_timeout_s=0.1)
    try:
        started = time.monotonic()
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await client.execute("PING", timeout_s=5)
        assert time.monotonic() - started < 0.5
    finally:
        await client.aclose()


async def test_garbage_from_the_server_fails_the_connection() -> None:
    server = QuietServer(reply=b"!not resp\r\n")
    await server.start()
    client = client_for(f"redis://127.0.0.1:{server.port}/0")
    try:
        with pytest.raises(RedisConnectionError, match="protocol error"):
            await client.execute("PING", timeout_s=1)
        assert not client.connected
    finally:
        await client.aclose()
        await server.close()


# ---------------------------------------------------------------- AUTH, SELECT, sockets, TLS


async def test_auth_with_a_password_and_with_an_acl_user(
    private_redis: RedisServer, admin: Redis
) -> None:
    await admin.acl_setuser(
        "alice", enabled=True, passwords=["+pw-a"], keys="*", commands=["+@all"]
    )
    await admin.config_set("requirepass", "s3cret")
    port = private_redis.port
    good = client_for(f"redis://:s3cret@127.0.0.1:{port}/0")
    alice = client_for(f"redis://alice:pw-a@127.0.0.1:{port}/0")
    wrong = client_for(f"redis://:nope@127.0.0.1:{port}/0")
    anonymous = client_for(f"redis://127.0.0.1:{port}/0")
    try:
        assert await good.execute("ACL", "WHOAMI", timeout_s=1) == b"default"
        assert await alice.execute("ACL", "WHOAMI", timeout_s=1) == b"alice"
        with pytest.raises(AuthenticationError, match="AUTH refused"):
            await wrong.execute("PING", timeout_s=1)
        assert not wrong.connected
        with pytest.raises(ResponseError, match="NOAUTH"):
            await anonymous.execute("PING", timeout_s=1)
        # the limiter, from a URL with a password
        lim = RedisLimiter(
            {"p": RATE},
            metrics=Metrics(),
            redis_url=f"redis://:s3cret@127.0.0.1:{port}/0",
            announce_interval_s=0,
        )
        try:
            [d] = await lim.decide([Check("p", RATE, "k")])
            assert d.allowed
            assert d.remaining == 3
            assert lim.backend_ok
        finally:
            await lim.close()
    finally:
        for client in (good, alice, wrong, anonymous):
            await client.aclose()


async def test_select_uses_the_database_of_the_url(private_redis: RedisServer) -> None:
    client = client_for(f"redis://127.0.0.1:{private_redis.port}/3")
    db3 = Redis.from_url(f"redis://127.0.0.1:{private_redis.port}/3")
    db0 = Redis.from_url(f"redis://127.0.0.1:{private_redis.port}/0")
    try:
        await client.execute("SET", "where", "three", timeout_s=1)
        assert await db3.get("where") == b"three"
        assert await db0.get("where") is None
    finally:
        await client.aclose()
        await db3.aclose()
        await db0.aclose()


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    sock = tmp_path / "redis.sock"
    server = RedisServer(None, "--unixsocket", str(sock), "--unixsocketperm", "700")
    server.start()
    try:
        yield server, sock
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_unix_socket(unix_redis: tuple[RedisServer, Path]) -> None:
    _, sock = unix_redis
    client = client_for(f"unix://{sock}?db=2")
    try:
        assert await client.execute("SET", "k", "v", timeout_s=1) == b"OK"
        info = await client.execute("CLIENT", "INFO", timeout_s=1)
        assert b"db=2" in info
        assert b"flags=U" in info  # a Unix-socket client
    finally:
        await client.aclose()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no TLS test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    tls_port = free_port()
    server = RedisServer(
        None,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    try:
        server.start()
    except RuntimeError:
        pytest.skip("redis-server does not start with TLS (built without it?)")
    try:
        yield server, tls_port, cert
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


async def test_tls(tls_redis: tuple[RedisServer, int, Path]) -> None:
    _, port, cert = tls_redis
    client = client_for(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}")
    untrusted = client_for(f"rediss://127.0.0.1:{port}/0")  # the system's CAs only
    try:
        assert await client.execute("SET", "k", b"over tls", timeout_s=2) == b"OK"
        assert await client.execute("GET", "k", timeout_s=2) == b"over tls"
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute("PING", timeout_s=2)
        lim = RedisLimiter(
            {"p": RATE},
            metrics=Metrics(),
            redis_url=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}",
            announce_interval_s=0,
            timeout_s=1.0,
        )
        try:
            results = [await lim.decide([Check("p", RATE, "k")]) for _ in range(5)]
            assert [r[0].allowed for r in results] == [True] * 4 + [False]
            assert lim.backend_ok
        finally:
            await lim.close()
    finally:
        await client.aclose()
        await untrusted.aclose()


# ---------------------------------------------------------------- the limiter on it


def limiter(url: str, metrics: Metrics, **kwargs: Any) -> RedisLimiter:
    return RedisLimiter(
        {"p": RATE},
        metrics=metrics,
        redis_url=url,
        key_prefix=f"gwtest:resp:{uuid.uuid4().hex[:8]}:",
        announce_interval_s=0,
        **kwargs,
    )


async def test_limiter_recovers_from_noscript_with_several_batches_in_flight(
    private_redis: RedisServer, admin: Redis
) -> None:
    metrics = Metrics()
    lim = limiter(private_redis.url, metrics, max_batch=8)
    try:
        await lim.decide([Check("p", RATE, "warm")])
        await admin.script_flush()
        results = await asyncio.gather(
            *[
                lim.decide([Check("p", RATE, f"k{i}"), Check("p", RATE, "shared")])
                for i in range(60)
            ]
        )
        assert [r[0].remaining for r in results] == [3] * 60
        assert sum(r[1].allowed for r in results) == 4  # exact, across 15 batches
        assert backend_errors(metrics) == 0
        assert lim.backend_ok
        await admin.script_flush()
        [d] = await lim.peek([Check("p", RATE, "k0")])
        assert (d.allowed, d.remaining) == (True, 2)  # peek recovers too, consuming nothing
        assert (await lim.decide([Check("p", RATE, "k0")]))[0].remaining == 2
        stats = await admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] >= 17
    finally:
        await lim.close()


async def test_limiter_reconnects_after_its_connection_is_killed_without_an_error(
    private_redis: RedisServer, admin: Redis
) -> None:
    metrics = Metrics()
    lim = limiter(private_redis.url, metrics)
    try:
        await lim.decide([Check("p", RATE, "k")])
        await admin.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.05)
        [d] = await lim.decide([Check("p", RATE, "k")])
        assert d.remaining == 2  # the state is in Redis, whichever connection asks
        assert backend_errors(metrics) == 0
        assert lim.backend_ok
    finally:
        await lim.close()


async def test_limiter_batch_deadline_against_a_silent_server(silent: QuietServer) -> None:
    metrics = Metrics()
    lim = limiter(f"redis://127.0.0.1:{silent.port}/0", metrics, timeout_s=0.1)
    try:
        started = time.monotonic()
        first = await asyncio.gather(*[lim.decide([Check("p", RATE, f"k{i}")]) for i in range(10)])
        assert 0.09 <= time.monotonic() - started < 0.5  # one deadline, not ten in a row
        assert all(r[0].allowed for r in first)  # the local fallback
        assert backend_errors(metrics) == 10
        await lim.decide([Check("p", RATE, "again")])
        assert silent.accepted == 2  # the timed-out connection was dropped, a new one opened
    finally:
        await lim.close()


async def test_clients_the_lean_connection_does_not_speak_for_go_through_redis_py(
    private_redis: RedisServer, admin: Redis
) -> None:
    """A client with a credential provider: decisions, peeks and NOSCRIPT through redis-py."""
    await admin.config_set("requirepass", "s3cret")
    client = Redis(
        port=private_redis.port,
        credential_provider=UsernamePasswordCredentialProvider("default", "s3cret"),
    )
    metrics = Metrics()
    lim = RedisLimiter({"p": RATE}, metrics=metrics, redis=client, announce_interval_s=0)
    try:
        assert lim._client is None
        results = await asyncio.gather(*[lim.decide([Check("p", RATE, "k")]) for _ in range(6)])
        assert [r[0].allowed for r in results] == [True] * 4 + [False] * 2
        await client.script_flush()
        [d] = await lim.peek([Check("p", RATE, "other")])
        assert (d.allowed, d.remaining) == (True, 3)
        [d] = await lim.decide([Check("p", RATE, "other")])
        assert (d.allowed, d.remaining) == (True, 3)
        assert backend_errors(metrics) == 0
        assert await client.ping()  # the client passed in stays open
    finally:
        await lim.close()
        await client.aclose()


async def test_closing_the_limiter_cancels_decisions_in_flight_without_an_outage(
    silent: QuietServer,
) -> None:
    lim = limiter(f"redis://127.0.0.1:{silent.port}/0", Metrics(), timeout_s=5.0)
    with capture_logs() as logs:
        waiting = asyncio.ensure_future(lim.decide([Check("p", RATE, "k")]))
        await asyncio.sleep(0.05)
        await lim.close()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert [e for e in logs if e["event"] == "redis_unavailable"] == []


def test_on_uvloop(private_redis: RedisServer) -> None:
    async def main() -> None:
        client = client_for(private_redis.url)
        try:
            assert await client.execute("PING", timeout_s=1) == b"PONG"
            await client.execute("SET", "s", "x", timeout_s=1)
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await client.execute("LPUSH", "s", "y", timeout_s=1)
            replies = await asyncio.gather(
                *[client.execute("INCR", "n", timeout_s=1) for _ in range(500)]
            )
            assert sorted(replies) == list(range(1, 501))
        finally:
            await client.aclose()
        metrics = Metrics()
        lim = limiter(private_redis.url, metrics)
        try:
            results = await asyncio.gather(
                *[lim.decide([Check("p", RATE, "hot"), Check("p", RATE, "x")]) for _ in range(6)]
            )
            assert [r[0].allowed for r in results].count(True) == 4
            assert backend_errors(metrics) == 0
        finally:
            await lim.close()
        silent = QuietServer()
        await silent.start()
        client = client_for(f"redis://127.0.0.1:{silent.port}/0")
        try:
            with pytest.raises(RedisTimeoutError):
                await client.execute("PING", timeout_s=0.05)
        finally:
            await client.aclose()
            await silent.close()

    uvloop.run(main())
