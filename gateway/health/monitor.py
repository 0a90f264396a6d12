"""Background health checks: upstreams, PostgreSQL, Redis and the event loop.

The :class:`HealthMonitor` runs one task per check, off the request path, and keeps the
latest :class:`~gateway.core.health.ComponentHealth` of every component in a dict that
is replaced (never mutated) on each update, so a probe reads a consistent snapshot in
O(1) and never waits on a dependency.

Every check is bounded by its ``timeout_s``: the check runs in its own task and the
monitor stops waiting when the time is up (a PostgreSQL port that accepts connections
and never answers cannot hang it; the pool is then dropped and rebuilt next round).

Components:

- ``upstream:NAME``: ``GET url + health.path``; 2xx and 3xx are successes (redirects are
  not followed); ``healthy_threshold`` / ``unhealthy_threshold`` in a row decide, the
  first result decides at once.  Critical per ``health.critical``.
- ``database``: ``SELECT 1`` (slower than ``degraded_latency_ms`` -> degraded) and
  ``required_tables`` (any missing -> unhealthy ``missing tables: ...``).  No DSN in the
  environment -> unhealthy ``GATEWAY_DATABASE_URL not set``.
- ``database:CHECK``: each ``database.checks`` query runs in a READ ONLY transaction with
  ``SET LOCAL statement_timeout``; its number is compared with ``degraded_above`` and
  ``unhealthy_above``.  While the database itself fails, each check reads unhealthy
  ``database unavailable``.  Critical as ``database.critical``.
- ``redis``: ``PING`` on the client given to the monitor (only when one is given).
- ``event_loop``: a task sleeping :attr:`HealthMonitor.LOOP_TICK_S` measures how late it
  wakes; above ``liveness.max_event_loop_lag_s`` unhealthy, above half of it degraded.
  Never critical: only ``/livez`` acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import aiohttp
import asyncpg

from gateway import __version__
from gateway.config import Database, DatabaseCheck, Liveness, RedisHealth, Settings, Upstream
from gateway.core.breaker import State
from gateway.core.health import (
    ComponentHealth,
    Status,
    ThresholdTracker,
    not_checked,
    threshold_status,
)
from gateway.lifecycle import Lifecycle
from gateway.logs import get_logger
from gateway.metrics import HEALTH_STATUSES, Metrics

__all__ = ["HealthMonitor", "breaker_observer"]

_T = TypeVar("_T")

_MAX_HEALTH_BODY = 65_536  # read at most this much of a health response (keep-alive reuse)
_MAX_MESSAGE = 200
_CLOSE_TIMEOUT_S = 1.0


def breaker_observer(upstream: str, metrics: Metrics, log: Any) -> Callable[[State, State], None]:
    """An ``on_transition`` callback for :class:`~gateway.core.breaker.Breaker`.

    Logs ``circuit_transition`` (warning when opening) and updates
    ``circuit_transitions_total`` and ``circuit_state``.  The initial ``closed`` state
    is not reported: call ``metrics.set_circuit_state(upstream, "closed")`` when the
    breaker is made.
    """
    transitions = metrics.circuit_transitions

    def on_transition(frm: State, to: State) -> None:
        transitions.labels(upstream, frm.value, to.value).inc()
        metrics.set_circuit_state(upstream, to.value)
        emit = log.warning if to is State.OPEN else log.info
        emit("circuit_transition", upstream=upstream, from_state=frm.value, to_state=to.value)

    return on_transition


def _describe(exc: BaseException) -> str:
    """A short, single-line description of a check error."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        text = exc.os_error.strerror or str(exc.os_error)
        return f"connect failed: {text}"
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | Decimal):
        return float(value)
    return None


@dataclass(frozen=True, slots=True)
class _Job:
    """One background check loop: what it depends on and how to run it."""

    fingerprint: Hashable
    run: Callable[[], Coroutine[Any, Any, None]]


class HealthMonitor:
    """Runs the background checks and caches their results for the probes."""

    LOOP_TICK_S: ClassVar[float] = 0.25
    """How often the event-loop lag is measured."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        redis: Any | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._redis = redis
        self._log = get_logger()
        self.lifecycle = lifecycle or Lifecycle()  # the process's drain, read by /readyz
        self._components: dict[str, ComponentHealth] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fingerprints: dict[str, Hashable] = {}
        self._pending_first: set[str] = set()
        self._orphans: set[asyncio.Task[Any]] = set()
        self._started = False
        self._running = False
        self._session: aiohttp.ClientSession | None = None
        self._pool: asyncpg.Pool | None = None
        self._pool_dsn: str | None = None
        self._lag_s = 0.0
        self._lag_due: float | None = None  # loop time the lag task should wake at
        self._components = self._initial_components(settings, {})
        for name in self._components:
            metrics.set_health_status(name, Status.UNHEALTHY.value)

    # ------------------------------------------------------------------ public API

    @property
    def draining(self) -> bool:
        """The drain was announced (``/readyz`` answers 503): the process's one flag."""
        return self.lifecycle.stopping

    @draining.setter
    def draining(self, value: bool) -> None:
        self.lifecycle.stopping = value

    @property
    def started(self) -> bool:
        """Config loaded and the first round of every check finished (latched)."""
        return self._started

    def components(self) -> dict[str, ComponentHealth]:
        """The latest result of every component (a snapshot: do not mutate it)."""
        return self._components

    def live(self) -> tuple[bool, str]:
        """Is the event loop responsive?  Never depends on any dependency."""
        lag = self._current_lag()
        limit = self._settings.config.liveness.max_event_loop_lag_s
        if lag >= limit:
            return False, f"event loop lag {lag:.3f}s over the limit of {limit:g}s"
        return True, f"event loop lag {lag:.3f}s"

    async def start(self) -> None:
        """Start the background checks (idempotent)."""
        if self._running:
            return
        self._running = True
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, limit_per_host=2),
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": f"gateway-health/{__version__}"},
            trust_env=False,
        )
        self._sync_jobs()

    async def close(self) -> None:
        """Stop every check and release the HTTP session and the database pool."""
        self._running = False
        tasks = [*self._tasks.values(), *self._orphans]
        self._tasks.clear()
        self._fingerprints.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S)
        await self._close_pool()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reconfigure(self, settings: Settings) -> None:
        """Apply a new config: restart the checks whose config changed.

        A component that stays keeps its last result until its restarted check
        reports; a new one reads ``not checked yet``; a removed one disappears (and
        its metric series with it).
        """
        old = self._components
        self._settings = settings
        new = self._initial_components(settings, old)
        for name in old.keys() - new.keys():
            for s in HEALTH_STATUSES:
                with contextlib.suppress(KeyError):  # never set
                    self._metrics.health_status.remove(name, s)
        for name in new.keys() - old.keys():
            self._metrics.set_health_status(name, Status.UNHEALTHY.value)
        self._components = new
        if self._running:
            self._sync_jobs()

    # ------------------------------------------------------------------ bookkeeping

    def _initial_components(
        self, settings: Settings, current: dict[str, ComponentHealth]
    ) -> dict[str, ComponentHealth]:
        cfg = settings.config
        wanted: list[tuple[str, bool]] = [
            (f"upstream:{name}", up.health.critical) for name, up in cfg.upstreams.items()
        ]
        if cfg.database is not None:
            wanted.append(("database", cfg.database.critical))
            wanted.extend(
                (f"database:{c.name}", cfg.database.critical) for c in cfg.database.checks
            )
        if self._redis is not None:
            wanted.append(("redis", cfg.redis_health.critical))
        wanted.append(("event_loop", False))
        out: dict[str, ComponentHealth] = {}
        for name, critical in wanted:
            prev = current.get(name)
            if prev is None:
                out[name] = not_checked(name, critical)
            elif prev.critical != critical:
                out[name] = dataclasses.replace(prev, critical=critical)
            else:
                out[name] = prev
        return out

    def _jobs(self, settings: Settings) -> dict[str, _Job]:
        cfg = settings.config
        jobs: dict[str, _Job] = {}
        for name, up in cfg.upstreams.items():
            jobs[f"upstream:{name}"] = _Job(
                (up.url, up.health), functools.partial(self._upstream_loop, name, up)
            )
        if cfg.database is not None:
            db, dsn = cfg.database, settings.secrets.database_dsn
            jobs["database"] = _Job((db, dsn), functools.partial(self._database_loop, db, dsn))
        if self._redis is not None:
            rh = cfg.redis_health
            jobs["redis"] = _Job(rh, functools.partial(self._redis_loop, rh))
        liveness = cfg.liveness
        jobs["event_loop"] = _Job(liveness, functools.partial(self._event_loop_loop, liveness))
        return jobs

    def _sync_jobs(self) -> None:
        jobs = self._jobs(self._settings)
        for name in list(self._tasks):
            job = jobs.get(name)
            if job is None or job.fingerprint != self._fingerprints[name]:
                self._tasks.pop(name).cancel()
                del self._fingerprints[name]
                self._pending_first.discard(name)
                if name == "database":
                    self._terminate_pool()
        for name, job in jobs.items():
            if name in self._tasks:
                continue
            self._fingerprints[name] = job.fingerprint
            if not self._started:
                self._pending_first.add(name)
            self._tasks[name] = asyncio.create_task(job.run(), name=f"health-check {name}")

    def _round_done(self, job: str) -> None:
        if self._started:
            return
        self._pending_first.discard(job)
        if not self._pending_first:
            self._started = True

    def _set(self, comp: ComponentHealth, duration_s: float | None = None) -> None:
        name = comp.name
        prev = self._components.get(name)
        if prev is None:  # removed by a reconfigure meanwhile
            return
        self._components = {**self._components, name: comp}
        if duration_s is not None:
            self._metrics.health_check_duration.labels(name).observe(duration_s)
        first = prev.last_checked is None
        if first or prev.status is not comp.status:
            self._metrics.set_health_status(name, comp.status.value)
            emit = self._log.warning if comp.status is Status.UNHEALTHY else self._log.info
            emit(
                "health_change",
                component=name,
                critical=comp.critical,
                message=comp.message,
                **{"from": None if first else prev.status.value, "to": comp.status.value},
            )

    async def _bounded(self, aw: Awaitable[_T], timeout_s: float) -> _T:
        """Await ``aw`` at most ``timeout_s``; on timeout stop waiting at once.

        The work runs in a task of its own that is cancelled (not awaited) when the time
        is up, so a peer that swallows the cancellation cannot hang the caller.
        """
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            self._adopt(task)
            raise
        if not done:
            task.cancel()
            self._adopt(task)
            raise TimeoutError
        return task.result()

    def _adopt(self, task: asyncio.Task[Any]) -> None:
        self._orphans.add(task)
        task.add_done_callback(self._orphan_done)

    def _orphan_done(self, task: asyncio.Task[Any]) -> None:
        self._orphans.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure of an abandoned check is expected

    async def _every(
        self, job: str, interval_s: float, one_round: Callable[[], Awaitable[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            try:
                await one_round()
            except Exception as exc:  # a bug in a check must not stop the others
                self._log.exception("health_check_error", component=job, error=_describe(exc))
            self._round_done(job)
            await asyncio.sleep(max(0.0, t0 + interval_s - loop.time()))

    # ------------------------------------------------------------------ upstreams

    async def _upstream_loop(self, name: str, up: Upstream) -> None:
        tracker = ThresholdTracker(up.health.healthy_threshold, up.health.unhealthy_threshold)

        async def one_round() -> None:
            await self._check_upstream(name, up, tracker)

        await self._every(f"upstream:{name}", up.health.interval_s, one_round)

    async def _http_status(self, url: str, timeout_s: float) -> int:
        session = self._session
        if session is None:
            raise RuntimeError("monitor is closed")
        async with session.get(
            url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.content.read(_MAX_HEALTH_BODY)
            return resp.status

    async def _check_upstream(self, name: str, up: Upstream, tracker: ThresholdTracker) -> None:
        hc = up.health
        url = up.url + hc.path
        t0 = time.perf_counter()
        code: int | None = None
        try:
            code = await self._bounded(self._http_status(url, hc.timeout_s), hc.timeout_s)
        except TimeoutError:
            error = f"timeout after {hc.timeout_s:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            error = _describe(exc)
        else:
            error = f"HTTP {code}"
        elapsed = time.perf_counter() - t0
        success = code is not None and 200 <= code < 400
        status = tracker.observe(success)
        if success and status is Status.UNHEALTHY:
            message = f"{error} ({tracker.successes}/{hc.healthy_threshold} to turn healthy)"
        elif not success and status is not Status.UNHEALTHY:
            message = f"{error} ({tracker.failures}/{hc.unhealthy_threshold} to turn unhealthy)"
        else:
            message = error
        details: dict[str, Any] = {"url": url, "http_status": code}
        comp = f"upstream:{name}"
        self._set(
            ComponentHealth(
                comp,
                status,
                hc.critical,
                elapsed * 1000 if code is not None else None,
                message,
                time.time(),
                details,
            ),
            elapsed,
        )

    # ------------------------------------------------------------------ database

    async def _database_loop(self, db: Database, dsn: str | None) -> None:
        async def one_round() -> None:
            await self._check_database(db, dsn)

        await self._every("database", db.interval_s, one_round)

    def _db_down(self, db: Database, message: str, latency_ms: float | None = None) -> None:
        now = time.time()
        self._set(
            ComponentHealth("database", Status.UNHEALTHY, db.critical, latency_ms, message, now)
        )
        for check in db.checks:
            name = f"database:{check.name}"
            self._set(
                ComponentHealth(
                    name,
                    Status.UNHEALTHY,
                    db.critical,
                    None,
                    f"database unavailable: {message}",
                    now,
                )
            )

    async def _get_pool(self, dsn: str, db: Database) -> asyncpg.Pool:
        if self._pool is not None and self._pool_dsn == dsn:
            return self._pool
        self._terminate_pool()
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

    def _terminate_pool(self) -> None:
        pool, self._pool, self._pool_dsn = self._pool, None, None
        if pool is not None:
            pool.terminate()

    async def _close_pool(self) -> None:
        pool, self._pool, self._pool_dsn = self._pool, None, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), _CLOSE_TIMEOUT_S)
        except Exception:  # TimeoutError included: give up politely, then abruptly
            pool.terminate()

    async def _check_database(self, db: Database, dsn: str | None) -> None:
        if dsn is None:
            self._db_down(db, f"{db.dsn_env} not set")
            return
        t0 = time.perf_counter()
        try:
            latency_ms, missing = await self._bounded(self._db_probe(dsn, db), db.timeout_s)
        except TimeoutError:
            self._terminate_pool()  # a hung connection is not given back to anyone
            self._db_down(db, f"timeout after {db.timeout_s:g}s")
            self._metrics.health_check_duration.labels("database").observe(time.perf_counter() - t0)
            return
        except Exception as exc:  # asyncpg raises many kinds (OSError, PostgresError, ...)
            self._db_down(db, _describe(exc))
            self._metrics.health_check_duration.labels("database").observe(time.perf_counter() - t0)
            return
        if missing:
            status, message = Status.UNHEALTHY, "missing tables: " + ", ".join(missing)
        elif latency_ms > db.degraded_latency_ms:
            status = Status.DEGRADED
            message = f"slow: SELECT 1 took {latency_ms:.1f} ms (> {db.degraded_latency_ms:g} ms)"
        else:
            status, message = Status.HEALTHY, "ok"
        self._set(
            ComponentHealth("database", status, db.critical, latency_ms, message, time.time()),
            time.perf_counter() - t0,
        )
        for check in db.checks:
            await self._run_db_check(dsn, db, check)

    async def _db_probe(self, dsn: str, db: Database) -> tuple[float, list[str]]:
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

    async def _db_query(self, dsn: str, db: Database, check: DatabaseCheck) -> Any:
        pool = await self._get_pool(dsn, db)
        timeout_ms = max(1, int(db.timeout_s * 1000))
        async with pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
            return await conn.fetchval(check.query)

    async def _run_db_check(self, dsn: str, db: Database, check: DatabaseCheck) -> None:
        name = f"database:{check.name}"
        t0 = time.perf_counter()
        value: float | None = None
        details: dict[str, Any] = {}
        try:
            raw = await self._bounded(self._db_query(dsn, db, check), db.timeout_s)
        except TimeoutError:
            self._terminate_pool()
            status, message = Status.UNHEALTHY, f"timeout after {db.timeout_s:g}s"
        except Exception as exc:
            status, message = Status.UNHEALTHY, _describe(exc)
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
        self._set(
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

    # ------------------------------------------------------------------ redis

    async def _redis_loop(self, cfg: RedisHealth) -> None:
        async def one_round() -> None:
            await self._check_redis(cfg)

        await self._every("redis", cfg.interval_s, one_round)

    async def _check_redis(self, cfg: RedisHealth) -> None:
        redis = self._redis
        if redis is None:
            return
        t0 = time.perf_counter()
        latency_ms: float | None = None
        try:
            await self._bounded(redis.ping(), cfg.timeout_s)
        except TimeoutError:
            status, message = Status.UNHEALTHY, f"timeout after {cfg.timeout_s:g}s"
        except Exception as exc:  # redis-py's errors, OSError, ...
            status, message = Status.UNHEALTHY, _describe(exc)
        else:
            latency_ms = (time.perf_counter() - t0) * 1000
            status, message = Status.HEALTHY, "ok"
        self._set(
            ComponentHealth("redis", status, cfg.critical, latency_ms, message, time.time()),
            time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ event loop

    def _current_lag(self) -> float:
        due = self._lag_due
        if due is None:
            return self._lag_s
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return self._lag_s
        # a loop blocked right now shows as a tick that is overdue
        return max(self._lag_s, now - due)

    async def _event_loop_loop(self, cfg: Liveness) -> None:
        loop = asyncio.get_running_loop()
        tick = self.LOOP_TICK_S
        limit = cfg.max_event_loop_lag_s
        try:
            while True:
                due = loop.time() + tick
                self._lag_due = due
                await asyncio.sleep(tick)
                lag = max(0.0, loop.time() - due)
                self._lag_s = lag
                status = threshold_status(lag, limit / 2, limit)
                message = f"lag {lag * 1000:.1f} ms"
                if status is not Status.HEALTHY:
                    message += f" (limit {limit:g}s)"
                self._set(
                    ComponentHealth(
                        "event_loop",
                        status,
                        critical=False,
                        latency_ms=lag * 1000,
                        message=message,
                        last_checked=time.time(),
                        details={"lag_s": round(lag, 6)},
                    )
                )
                self._round_done("event_loop")
        finally:
            self._lag_due = None
