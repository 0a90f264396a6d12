"""``database`` and ``database:CHECK``: PostgreSQL, through a small pool of its own.

``database``: ``SELECT 1`` (slower than ``degraded_latency_ms`` -> degraded) and
``required_tables`` (any missing -> unhealthy ``missing tables: ...``).  No DSN in the
environment -> unhealthy ``GATEWAY_DATABASE_URL not set``.

``database:CHECK``: each ``database.checks`` query runs in a READ ONLY transaction with
``SET LOCAL statement_timeout``; its number is compared with ``degraded_above`` and
``unhealthy_above``.  While the database itself fails, each check reads unhealthy
``database unavailable``.  Critical as ``database.critical``.

A round past its timeout drops the pool (a hung connection is not given back to
anyone); the next round builds a new one.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import asyncpg

from gateway.config import Database, DatabaseCheck
from gateway.core.health import ComponentHealth, Status, threshold_status
from gateway.health.checks.bounded import Bounded, Report, describe
from gateway.metrics import Metrics

__all__ = ["DatabaseChecks"]

_CLOSE_TIMEOUT_S = 1.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | Decimal):
        return float(value)
    return None


class DatabaseChecks:
    """The database checks and the pool they share."""

    __slots__ = ("_bounded", "_metrics", "_pool", "_pool_dsn", "_report")

    def __init__(self, bounded: Bounded, report: Report, metrics: Metrics) -> None:
        self._bounded = bounded
        self._report = report
        self._metrics = metrics
        self._pool: asyncpg.Pool | None = None
        self._pool_dsn: str | None = None

    def _down(self, db: Database, message: str, latency_ms: float | None = None) -> None:
        now = time.time()
        self._report(
            ComponentHealth("database", Status.UNHEALTHY, db.critical, latency_ms, message, now),
            None,
        )
        for check in db.checks:
            name = f"database:{check.name}"
            self._report(
                ComponentHealth(
                    name,
                    Status.UNHEALTHY,
                    db.critical,
                    None,
                    f"database unavailable: {message}",
                    now,
                ),
                None,
            )

    async def _get_pool(self, dsn: str, db: Database) -> asyncpg.Pool:
        if self._pool is not None and self._pool_dsn == dsn:
            return self._pool
        self.terminate_pool()
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=2,
            timeout=db.timeout_s,  # connect timeout
            command_timeout=db.timeout_s,
            max_inactive_connection_lifetime=max(60.0, 3 * db.interval_s),
            server_settings={"application_name": "gateway-health"},
        )
        self._pool, self._pool_dsn = pool, dsn
        return pool

    def terminate_pool(self) -> None:
        """Drop the pool at once (its connections are closed, not waited for)."""
        pool, self._pool, self._pool_dsn = self._pool, None, None
        if pool is not None:
            pool.terminate()

    async def close_pool(self) -> None:
        """Close the pool politely, then abruptly past a second."""
        pool, self._pool, self._pool_dsn = self._pool, None, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
        except Exception:  # TimeoutError included: give up politely, then abruptly
            pool.terminate()

    async def check(self, db: Database, dsn: str | None) -> None:
        """One round: the database, then each of its checks."""
        if dsn is None:
            self._down(db, f"{db.dsn_env} not set")
            return
        t0 = time.perf_counter()
        try:
            latency_ms, missing = await self._bounded(self._probe(dsn, db), db.timeout_s)
        except TimeoutError:
            self.terminate_pool()  # a hung connection is not given back to anyone
            self._down(db, f"timeout after {db.timeout_s:g}s")
            self._metrics.health_check_duration.labels("database").observe(time.perf_counter() - t0)
            return
        except Exception as exc:  # asyncpg raises many kinds (OSError, PostgresError, ...)
            self._down(db, describe(exc))
            self._metrics.health_check_duration.labels("database").observe(time.perf_counter() - t0)
            return
        if missing:
            status, message = Status.UNHEALTHY, "missing tables: " + ", ".join(missing)
        elif latency_ms > db.degraded_latency_ms:
            status = Status.DEGRADED
            message = f"slow: SELECT 1 took {latency_ms:.1f} ms (> {db.degraded_latency_ms:g} ms)"
        else:
            status, message = Status.HEALTHY, "ok"
        self._report(
            ComponentHealth("database", status, db.critical, latency_ms, message, time.time()),
            time.perf_counter() - t0,
        )
        for check in db.checks:
            await self._run_check(dsn, db, check)

    async def _probe(self, dsn: str, db: Database) -> tuple[float, list[str]]:
        pool = await self._get_pool(dsn, db)
        async with pool.acquire() as conn:
            t0 = time.perf_counter()
            await conn.fetchval("SELECT 1")
            latency_ms = (time.perf_counter() - t0) * 1000
            missing: list[str] = []
            if db.required_tables:
                missing = await conn.fetchval(
                    "SELECT coalesce(array_agg(t ORDER BY ord), '{}')"
                    " FROM unnest($1::text[]) WITH ORDINALITY AS u(t, ord)"
                    " WHERE to_regclass(t) IS NULL",
                    list(db.required_tables),
                )
        return latency_ms, list(missing)

    async def _query(self, dsn: str, db: Database, check: DatabaseCheck) -> Any:
        pool = await self._get_pool(dsn, db)
        timeout_ms = max(1, int(db.timeout_s * 1000))
        async with pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
            return await conn.fetchval(check.query)

    async def _run_check(self, dsn: str, db: Database, check: DatabaseCheck) -> None:
        name = f"database:{check.name}"
        t0 = time.perf_counter()
        value: float | None = None
        details: dict[str, Any] = {}
        try:
            raw = await self._bounded(self._query(dsn, db, check), db.timeout_s)
        except TimeoutError:
            self.terminate_pool()
            status, message = Status.UNHEALTHY, f"timeout after {db.timeout_s:g}s"
        except Exception as exc:
            status, message = Status.UNHEALTHY, describe(exc)
        else:
            value = _number(raw)
            if value is None:
                status, message = Status.UNHEALTHY, f"query did not return a number: {raw!r}"
            else:
                status = threshold_status(value, check.degraded_above, check.unhealthy_above)
                message = f"value {value:g}"
                if status is Status.UNHEALTHY:
                    message += f" > {check.unhealthy_above:g}"
                elif status is Status.DEGRADED:
                    message += f" > {check.degraded_above:g}"
                details = {
                    "value": value,
                    "degraded_above": check.degraded_above,
                    "unhealthy_above": check.unhealthy_above,
                }
        elapsed = time.perf_counter() - t0
        self._report(
            ComponentHealth(
                name,
                status,
                db.critical,
                elapsed * 1000 if value is not None else None,
                message,
                time.time(),
                details,
            ),
            elapsed,
        )
