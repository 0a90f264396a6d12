"""The health monitor: runs the background checks and keeps the components map.

The :class:`HealthMonitor` runs one task per check, off the request path, and keeps the
latest :class:`~gateway.core.health.ComponentHealth` of every component in a dict that
is replaced (never mutated) on each update, so a probe reads a consistent snapshot in
O(1) and never waits on a dependency.

Every check is bounded by its ``timeout_s``; the checks themselves, one module a kind
of component (``upstream:NAME``, ``database``, ``database:CHECK``, ``redis``,
``event_loop``), are in :mod:`gateway.health.checks`.  A component's result replaces
its entry; the components wanted follow the config (:meth:`HealthMonitor.reconfigure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp

from gateway import __version__
from gateway.config import Database, Liveness, RedisHealth, Settings, Upstream
from gateway.core.health import ComponentHealth, Status, ThresholdTracker, not_checked
from gateway.health.checks.bounded import Bounded, describe
from gateway.health.checks.database import DatabaseChecks
from gateway.health.checks.event_loop import LoopLag
from gateway.health.checks.redis import check_redis
from gateway.health.checks.upstream import check_upstream
from gateway.lifecycle import Lifecycle
from gateway.logs import get_logger
from gateway.metrics import HEALTH_STATUSES, Metrics

__all__ = ["HealthMonitor"]

_CLOSE_TIMEOUT_S = 1.0


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
        self._since: dict[str, float] = {}  # unix time each component's status last changed
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fingerprints: dict[str, Hashable] = {}
        self._pending_first: set[str] = set()
        self._bounded = Bounded()
        self._started = False
        self._running = False
        self._session: aiohttp.ClientSession | None = None
        self._database = DatabaseChecks(self._bounded, self._set, metrics)
        self._lag = LoopLag()
        self._components = self._initial_components(settings, {})
        for name in self._components:
            metrics.set_health_status(name, Status.UNHEALTHY.value)

    # ------------------------------------------------------------------ public API

    @property
    def loop_lag(self) -> LoopLag:
        """The event loop's lag, as the ``event_loop`` check last measured it."""
        return self._lag

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

    def since(self, name: str) -> float | None:
        """When ``name``'s status last changed (unix time), None before its first check."""
        return self._since.get(name)

    def live(self) -> tuple[bool, str]:
        """Is the event loop responsive?  Never depends on any dependency."""
        lag = self._lag.current()
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
        tasks = [*self._tasks.values(), *self._bounded.orphans]
        self._tasks.clear()
        self._fingerprints.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S)
        await self._database.close_pool()
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
                    self._database.terminate_pool()
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
            self._since[name] = time.time()
            self._metrics.set_health_status(name, comp.status.value)
            emit = self._log.warning if comp.status is Status.UNHEALTHY else self._log.info
            emit(
                "health_change",
                component=name,
                critical=comp.critical,
                message=comp.message,
                **{"from": None if first else prev.status.value, "to": comp.status.value},
            )

    async def _every(
        self, job: str, interval_s: float, one_round: Callable[[], Awaitable[None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            try:
                await one_round()
            except Exception as exc:  # a bug in a check must not stop the others
                self._log.exception("health_check_error", component=job, error=describe(exc))
            self._round_done(job)
            await asyncio.sleep(max(0.0, t0 + interval_s - loop.time()))

    # ------------------------------------------------------------------ upstreams

    async def _upstream_loop(self, name: str, up: Upstream) -> None:
        tracker = ThresholdTracker(up.health.healthy_threshold, up.health.unhealthy_threshold)

        async def one_round() -> None:
            await check_upstream(
                self._session, self._bounded, self._set, name=name, up=up, tracker=tracker
            )

        await self._every(f"upstream:{name}", up.health.interval_s, one_round)

    # ------------------------------------------------------------------ database

    async def _database_loop(self, db: Database, dsn: str | None) -> None:
        async def one_round() -> None:
            await self._database.check(db, dsn)

        await self._every("database", db.interval_s, one_round)

    # ------------------------------------------------------------------ redis

    async def _redis_loop(self, cfg: RedisHealth) -> None:
        async def one_round() -> None:
            if self._redis is not None:
                await check_redis(self._redis, self._bounded, self._set, cfg)

        await self._every("redis", cfg.interval_s, one_round)

    # ------------------------------------------------------------------ event loop

    async def _event_loop_loop(self, cfg: Liveness) -> None:
        await self._lag.run(cfg, self.LOOP_TICK_S, self._set, self._event_loop_round)

    def _event_loop_round(self) -> None:
        self._round_done("event_loop")
