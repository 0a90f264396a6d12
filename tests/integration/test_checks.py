"""Background health checks over real sockets, the real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from gateway.config import CircuitBreaker, Settings, load_text
from gateway.core.breaker import Breaker
from gateway.core.health import Status
from gateway.health.monitor import HealthMonitor
from gateway.health.probes import probe_response
from gateway.logs import get_logger
from gateway.metrics import Metrics, breaker_observer
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.timeout(30)

H, D, U = Status.HEALTHY, Status.DEGRADED, Status.UNHEALTHY


@pytest.fixture(autouse=True)
def fast_lag_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HealthMonitor, "LOOP_TICK_S", 0.05)


@pytest.fixture
def captured() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as logs:
        yield logs


def settings(yaml_text: str, **env: str) -> Settings:
    return load_text(textwrap.dedent(yaml_text), environ=env)


def port(server: TestServer) -> int:
    assert server.port is not None
    return server.port


def count_sql(table: str) -> str:
    return f"SELECT count(*) FROM {table}"  # noqa: S608 - a generated test table name


def insert_sql(table: str, rows: int) -> str:
    return f"INSERT INTO {table} SELECT generate_series(1, {rows})"


def upstream_yaml(port: int, *, healthy: int = 2, unhealthy: int = 3, critical: bool = True) -> str:
    return f"""
    upstreams:
      api:
        url: http://127.0.0.1:{port}
        health: {{path: /health, interval_s: 0.1, timeout_s: 0.5,
                 healthy_threshold: {healthy}, unhealthy_threshold: {unhealthy},
                 critical: {str(critical).lower()}}}
    """


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(
    s: Settings, *, redis: Any | None = None, metrics: Metrics | None = None
) -> AsyncIterator[HealthMonitor]:
    monitor = HealthMonitor(s, metrics=metrics or Metrics(), redis=redis)
    await monitor.start()
    try:
        yield monitor
    finally:
        await monitor.close()


def checked(monitor: HealthMonitor, name: str) -> Callable[[], bool]:
    return lambda: monitor.components()[name].last_checked is not None


def gauge(metrics: Metrics, component: str, status: str) -> float | None:
    return metrics.registry.get_sample_value(
        "gateway_health_status", {"component": component, "status": status}
    )


class SwitchableHealth:
    """An upstream whose /health answers ``status``; counts the checks it gets."""

    def __init__(self) -> None:
        self.status = 200
        self.hits = 0
        self.app = web.Application()
        self.app.router.add_get("/health", self.health)

    async def health(self, _request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text="x")


# --------------------------------------------------------------------------- upstreams


async def test_upstream_thresholds(aiohttp_server: AiohttpServer) -> None:
    up = SwitchableHealth()
    server = await aiohttp_server(up.app)
    metrics = Metrics()
    with capture_logs() as logs:
        async with running(settings(upstream_yaml(port(server))), metrics=metrics) as monitor:
            name = "upstream:api"
            assert monitor.components()[name].message == "not checked yet"
            await wait_until(checked(monitor, name))
            comp = monitor.components()[name]
            assert comp.status is H  # the first result decides at once
            assert comp.message == "HTTP 200"
            assert comp.latency_ms is not None
            assert comp.details["http_status"] == 200

            up.status, up.hits = 503, 0
            await wait_until(lambda: monitor.components()[name].status is U)
            assert up.hits == 3  # unhealthy_threshold failures in a row
            assert monitor.components()[name].message == "HTTP 503"
            assert gauge(metrics, name, "unhealthy") == 1
            assert gauge(metrics, name, "healthy") == 0

            up.status, up.hits = 204, 0
            await wait_until(lambda: monitor.components()[name].status is H)
            assert up.hits == 2  # healthy_threshold successes in a row

    ups = [
        (e["from"], e["to"])
        for e in logs
        if e["event"] == "health_change" and e["component"] == name
    ]
    assert ups == [(None, "healthy"), ("healthy", "degraded"), ("degraded", "unhealthy"),
                   ("unhealthy", "healthy")]  # fmt: skip
    degraded = [e for e in logs if e["event"] == "health_change" and e["to"] == "degraded"]
    assert degraded[0]["message"] == "HTTP 503 (1/3 to turn unhealthy)"
    assert degraded[0]["log_level"] == "info"
    unhealthy = [e for e in logs if e["event"] == "health_change" and e["to"] == "unhealthy"]
    assert unhealthy[0]["log_level"] == "warning"
    assert (
        metrics.registry.get_sample_value(
            "gateway_health_check_duration_seconds_count", {"component": name}
        )
        or 0
    ) >= 6


async def test_upstream_refused_and_redirect(aiohttp_server: AiohttpServer) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application()
    app.router.add_get("/health", redirect)
    server = await aiohttp_server(app)
    closed_port = free_port()
    s = settings(
        f"""
        upstreams:
          api: {{url: "http://127.0.0.1:{server.port}", health: {{interval_s: 0.1}}}}
          gone: {{url: "http://127.0.0.1:{closed_port}", health: {{interval_s: 0.1}}}}
        """
    )
    async with running(s) as monitor:
        await wait_until(checked(monitor, "upstream:api"))
        await wait_until(checked(monitor, "upstream:gone"))
        comps = monitor.components()
        assert comps["upstream:api"].status is H  # 3xx counts as up, not followed
        assert comps["upstream:api"].message == "HTTP 302"
        gone = comps["upstream:gone"]
        assert gone.status is U
        assert gone.message.startswith("connect failed")
        assert gone.latency_ms is None


async def test_upstream_timeout(aiohttp_server: AiohttpServer) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", slow)
    server = await aiohttp_server(app)
    s = settings(
        f"""
        upstreams:
          api: {{url: "http://127.0.0.1:{server.port}",
                 health: {{interval_s: 0.1, timeout_s: 0.2, unhealthy_threshold: 1}}}}
        """
    )
    async with running(s) as monitor:
        t0 = time.monotonic()
        await wait_until(checked(monitor, "upstream:api"))
        assert time.monotonic() - t0 < 1.0
        comp = monitor.components()["upstream:api"]
        assert comp.status is U
        assert comp.message == "timeout after 0.2s"


# --------------------------------------------------------------------------- database


def db_yaml(body: str) -> str:
    return "database:\n" + textwrap.indent(textwrap.dedent(body), "  ")


@pytest.fixture
def table_name() -> str:
    return f"gw_health_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def scratch_table(pg_dsn: str, table_name: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(f"CREATE TABLE {table_name} (id int)")
    try:
        yield conn
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table_name}")
        await conn.close()


async def test_database_healthy_and_missing_tables(pg_dsn: str, table_name: str) -> None:
    s = settings(
        db_yaml(
            f"""
            interval_s: 0.1
            timeout_s: 1
            degraded_latency_ms: 1000
            required_tables: [pg_catalog.pg_class, {table_name}, public.{table_name}_b]
            """
        ),
        GATEWAY_DATABASE_URL=pg_dsn,
    )
    async with running(s) as monitor:
        await wait_until(checked(monitor, "database"))
        comp = monitor.components()["database"]
        assert comp.status is U
        assert comp.message == f"missing tables: {table_name}, public.{table_name}_b"
        assert comp.latency_ms is not None
        assert comp.critical is False

        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f"CREATE TABLE {table_name} (id int)")
            await conn.execute(f"CREATE TABLE {table_name}_b (id int)")
            await wait_until(lambda: monitor.components()["database"].status is H)
            assert monitor.components()["database"].message == "ok"
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {table_name}, {table_name}_b")
            await conn.close()


async def test_database_check_thresholds(
    pg_dsn: str, table_name: str, scratch_table: asyncpg.Connection
) -> None:
    s = settings(
        db_yaml(
            f"""
            critical: true
            interval_s: 0.1
            timeout_s: 1
            degraded_latency_ms: 1000
            checks:
              - {{name: backlog, query: "{count_sql(table_name)}",
                 degraded_above: 2, unhealthy_above: 5}}
            """
        ),
        GATEWAY_DATABASE_URL=pg_dsn,
    )
    name = "database:backlog"
    async with running(s) as monitor:
        await wait_until(checked(monitor, name))
        comp = monitor.components()[name]
        assert (comp.status, comp.message, comp.critical) == (H, "value 0", True)

        await scratch_table.execute(insert_sql(table_name, 3))
        await wait_until(lambda: monitor.components()[name].status is D)
        comp = monitor.components()[name]
        assert comp.message == "value 3 > 2"
        assert comp.details == {"value": 3.0, "degraded_above": 2, "unhealthy_above": 5}

        await scratch_table.execute(insert_sql(table_name, 3))
        await wait_until(lambda: monitor.components()[name].status is U)
        assert monitor.components()[name].message == "value 6 > 5"
        assert monitor.components()["database"].status is H


async def test_database_checks_are_read_only_and_bounded(
    pg_dsn: str, table_name: str, scratch_table: asyncpg.Connection
) -> None:
    await scratch_table.execute(insert_sql(table_name, 1))
    writer = f"WITH d AS (DELETE FROM {table_name} RETURNING 1) SELECT count(*) FROM d"  # noqa: S608
    sleeper = "SELECT count(*) FROM pg_sleep(5)"
    text = "SELECT 'abc'"
    s = settings(
        db_yaml(
            f"""
            interval_s: 0.2
            timeout_s: 0.3
            degraded_latency_ms: 1000
            checks:
              - {{name: writer, query: "{writer}"}}
              - {{name: sleeper, query: "{sleeper}"}}
              - {{name: text, query: "{text}"}}
            """
        ),
        GATEWAY_DATABASE_URL=pg_dsn,
    )
    async with running(s) as monitor:
        t0 = time.monotonic()
        await wait_until(checked(monitor, "database:text"))
        assert time.monotonic() - t0 < 2.0  # the sleeper was cut at timeout_s
        comps = monitor.components()
        assert comps["database"].status is H
        assert comps["database:writer"].status is U
        assert "read-only transaction" in comps["database:writer"].message
        assert comps["database:sleeper"].status is U
        assert "timeout" in comps["database:sleeper"].message
        assert comps["database:text"].status is U
        assert comps["database:text"].message == "query did not return a number: 'abc'"
    assert await scratch_table.fetchval(count_sql(table_name)) == 1


async def test_database_dsn_not_set() -> None:
    s = settings(
        db_yaml(
            """
            critical: true
            interval_s: 0.1
            checks: [{name: backlog, query: "SELECT 1"}]
            """
        )
    )
    async with running(s) as monitor:
        await wait_until(checked(monitor, "database:backlog"))
        comps = monitor.components()
        assert comps["database"].status is U
        assert comps["database"].message == "GATEWAY_DATABASE_URL not set"
        assert comps["database"].critical is True
        assert comps["database:backlog"].status is U
        assert comps["database:backlog"].message == (
            "database unavailable: GATEWAY_DATABASE_URL not set"
        )


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read(-1)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for w in held:
            w.close()
        await server.wait_closed()


async def test_database_that_never_answers(silent_port: int) -> None:
    s = settings(
        db_yaml(
            """
            critical: true
            interval_s: 0.1
            timeout_s: 0.3
            checks: [{name: backlog, query: "SELECT 1"}]
            """
        ),
        GATEWAY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent_port}/test",
    )
    monitor = HealthMonitor(s, metrics=Metrics())
    await monitor.start()
    try:
        await wait_until(lambda: monitor.started)
        comps = monitor.components()
        assert comps["database"].status is U
        assert comps["database"].message == "timeout after 0.3s"
        assert comps["database:backlog"].status is U
        assert monitor.live()[0]

        # probes answer from cached state while checks hang in the background
        for path in ("/livez", "/startupz", "/readyz", "/healthz", "/readyz/database"):
            for query in ("", "?verbose", "?format=json"):
                request = make_mocked_request("GET", path + query)
                t0 = time.perf_counter()
                response = await probe_response(request, monitor)
                assert time.perf_counter() - t0 < 0.05
                assert response is not None
                assert response.status == (200 if path in ("/livez", "/startupz") else 503)
    finally:
        t0 = time.monotonic()
        await monitor.close()
        assert time.monotonic() - t0 < 2.0


async def test_database_recovers_after_outage(pg_dsn: str, silent_port: int) -> None:
    """Pointing at a dead server and back (config reload) recovers without a restart."""
    body = """
        interval_s: 0.1
        timeout_s: 0.3
        degraded_latency_ms: 1000
    """
    good = settings(db_yaml(body), GATEWAY_DATABASE_URL=pg_dsn)
    bad = settings(
        db_yaml(body), GATEWAY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent_port}/test"
    )
    async with running(good) as monitor:
        await wait_until(lambda: monitor.components()["database"].status is H)
        monitor.reconfigure(bad)
        await wait_until(lambda: monitor.components()["database"].status is U)
        monitor.reconfigure(good)
        await wait_until(lambda: monitor.components()["database"].status is H)


# --------------------------------------------------------------------------- redis


async def test_redis_ping(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        s = settings("redis_health: {critical: true, interval_s: 0.1, timeout_s: 0.5}")
        async with running(s, redis=client) as monitor:
            await wait_until(checked(monitor, "redis"))
            comp = monitor.components()["redis"]
            assert (comp.status, comp.message, comp.critical) == (H, "ok", True)
            assert comp.latency_ms is not None
            assert comp.latency_ms < 500
    finally:
        await client.aclose()


async def test_redis_down_and_back(private_redis: RedisServer) -> None:
    client = aioredis.from_url(private_redis.url, socket_connect_timeout=0.2)
    try:
        s = settings("redis_health: {interval_s: 0.1, timeout_s: 0.5}")
        async with running(s, redis=client) as monitor:
            await wait_until(lambda: monitor.components()["redis"].status is H)
            private_redis.stop()
            await wait_until(lambda: monitor.components()["redis"].status is U)
            assert monitor.components()["redis"].critical is False
            private_redis.start()
            await wait_until(lambda: monitor.components()["redis"].status is H)
    finally:
        await client.aclose()


def test_no_redis_component_without_a_client() -> None:
    monitor = HealthMonitor(settings(""), metrics=Metrics())
    assert "redis" not in monitor.components()
    assert list(monitor.components()) == ["upstream:api", "event_loop"]


# --------------------------------------------------------------------------- event loop


async def test_event_loop_lag(captured: list[MutableMapping[str, Any]]) -> None:
    s = settings("liveness: {max_event_loop_lag_s: 0.2}")
    async with running(s) as monitor:
        await wait_until(checked(monitor, "event_loop"))
        ok, message = monitor.live()
        assert ok, message
        assert monitor.components()["event_loop"].critical is False

        time.sleep(0.3)  # blocking the loop on purpose
        ok, message = monitor.live()  # seen at once, before the lag task even runs
        assert not ok
        assert "over the limit of 0.2s" in message

        def loop_changes() -> list[str]:
            return [
                e["to"]
                for e in captured
                if e["event"] == "health_change" and e["component"] == "event_loop"
            ]

        await wait_until(lambda: loop_changes()[-2:] == ["unhealthy", "healthy"])
        assert loop_changes() == ["healthy", "unhealthy", "healthy"]
        assert monitor.live()[0]


def test_live_before_start() -> None:
    monitor = HealthMonitor(settings(""), metrics=Metrics())
    assert monitor.live()[0]
    assert not monitor.started


# --------------------------------------------------------------------------- lifecycle


async def test_started_after_first_round_and_reconfigure(aiohttp_server: AiohttpServer) -> None:
    up = SwitchableHealth()
    server = await aiohttp_server(up.app)
    metrics = Metrics()
    s1 = settings(upstream_yaml(port(server)))
    monitor = HealthMonitor(s1, metrics=metrics)
    assert not monitor.started
    assert gauge(metrics, "upstream:api", "unhealthy") == 1
    await monitor.start()
    try:
        await wait_until(lambda: monitor.started)
        assert all(c.last_checked is not None for c in monitor.components().values())

        s2 = settings(
            f"""
            upstreams:
              api: {{url: "http://127.0.0.1:{server.port}", health: {{interval_s: 0.1,
                     critical: false}}}}
              bot: {{url: "http://127.0.0.1:{server.port}", health: {{interval_s: 0.1}}}}
            """
        )
        monitor.reconfigure(s2)
        comps = monitor.components()
        assert list(comps) == ["upstream:api", "upstream:bot", "event_loop"]
        assert comps["upstream:api"].status is H  # kept until its new check reports
        assert comps["upstream:api"].critical is False
        assert comps["upstream:bot"].message == "not checked yet"
        assert monitor.started  # stays latched
        await wait_until(checked(monitor, "upstream:bot"))

        monitor.reconfigure(settings(upstream_yaml(port(server))))
        assert "upstream:bot" not in monitor.components()
        assert gauge(metrics, "upstream:bot", "unhealthy") is None  # series removed
        hits = up.hits
        await asyncio.sleep(0.35)
        assert 2 <= up.hits - hits <= 5  # only api is checked now, every 0.1 s
    finally:
        await monitor.close()


async def test_close_is_idempotent_and_start_twice_is_harmless() -> None:
    monitor = HealthMonitor(settings(""), metrics=Metrics())
    await monitor.start()
    await monitor.start()
    await monitor.close()
    await monitor.close()


# --------------------------------------------------------------------------- breaker observer


def test_breaker_observer(captured: list[MutableMapping[str, Any]]) -> None:
    metrics = Metrics()
    breaker = Breaker(
        CircuitBreaker(consecutive_failures=1, open_s=1, half_open_requests=1),
        on_transition=breaker_observer("api", metrics, get_logger()),
    )
    breaker.record(0, failure=True)
    assert breaker.acquire(1)
    breaker.record(1, failure=False)

    events = [(e["event"], e["from_state"], e["to_state"], e["log_level"]) for e in captured]
    assert events == [
        ("circuit_transition", "closed", "open", "warning"),
        ("circuit_transition", "open", "half_open", "info"),
        ("circuit_transition", "half_open", "closed", "info"),
    ]
    assert all(e["upstream"] == "api" for e in captured)
    sample = metrics.registry.get_sample_value

    def transitions(frm: str, to: str) -> float | None:
        return sample(
            "gateway_circuit_transitions_total",
            {"upstream": "api", "from_state": frm, "to_state": to},
        )

    assert transitions("closed", "open") == 1
    assert transitions("half_open", "closed") == 1
    assert sample("gateway_circuit_state", {"upstream": "api", "state": "closed"}) == 1
    assert sample("gateway_circuit_state", {"upstream": "api", "state": "open"}) == 0
