"""The gateway's state: one object holding the current snapshot and every stateful part.

Stateful parts (rate-limit buckets, bans, breakers, pools, health checks) outlive a
config reload; :meth:`Runtime.apply` swaps the snapshot and reconfigures them, keeping
what did not change.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from gateway.core.failure_budget import FailureBudget
from gateway.core.inflight import InflightCounts
from gateway.core.window_stats import RouteSeries, TopKeys
from gateway.core.wsguard import sweep_interval_s
from gateway.health.monitor import HealthMonitor
from gateway.identity.resolver import failure_rate
from gateway.lifecycle import Lifecycle
from gateway.logs import AccessLog, EventBudget, get_logger
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics
from gateway.pipeline.snapshot import NO_ROUTE, Snapshot
from gateway.pipeline.wsregistry import WebSocketRegistry
from gateway.stores import make_allow_list, make_ban_store, make_limiter
from gateway.stores.limiter import rates_from_config
from gateway.upstream.state import UpstreamState

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from gateway.config import Settings
    from gateway.loopmetrics import CounterChild as Counter
    from gateway.loopmetrics import HistogramChild as Histogram
    from gateway.stores.bans import BanStore
    from gateway.stores.limiter import Limiter
    from gateway.stores.memory.bans import MemoryBanStore
    from gateway.stores.memory.limiter import MemoryLimiter
    from gateway.stores.redis.limiter import RedisLimiter
    from gateway.tracing import SpanExport


_time: Final = time.time


class RouteFigures:
    """What :meth:`Runtime.count_request` updates for one route, found with one lookup:
    the route's duration histogram, its window series (made on first use), and the
    ``requests_total`` child of the last method and status counted."""

    __slots__ = ("duration", "method", "requests", "series", "status")

    def __init__(self, duration: Histogram) -> None:
        self.duration = duration
        self.series: RouteSeries | None = None
        self.method = ""
        self.status = 0
        self.requests: Counter | None = None  # (None: the first request looks it up)


class Runtime:
    """Everything a request may touch, plus the means to reconfigure it."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        cfg = settings.config
        self.metrics = metrics or Metrics()
        self.log = get_logger("gateway")
        self.access_log = AccessLog()
        # refusal events are capped so an attack cannot flood the logs (metrics count all)
        self.limited_log_budget = EventBudget(50)
        self.shadow_log_budget = EventBudget(50)
        self.settings = settings
        self.redis: Any | None = None
        if cfg.rate_limit.backend == "redis" and settings.secrets.redis_url:
            from gateway.stores.redis.client import make_redis  # noqa: PLC0415 - redis only

            self.redis = make_redis(settings.secrets.redis_url)
        # (the backends' own classes named beside their base: the compiled pipeline calls
        # theirs directly, any other's by name)
        self.limiter: MemoryLimiter | RedisLimiter | Limiter = make_limiter(
            cfg.rate_limit, settings.secrets.redis_url, metrics=self.metrics, redis=self.redis
        )
        self.bans: MemoryBanStore | BanStore = make_ban_store(
            cfg.abuse, metrics=self.metrics, redis=self.redis
        )
        # failed token checks per client address: kept across reloads, like the bans
        rate = failure_rate(cfg.identity)
        self.verify_failures = FailureBudget(rate) if rate is not None else None
        self._identity_counts: dict[tuple[str, str], Counter] = {}
        # break-glass exemptions from bans and limits (POST /admin/allow)
        self.allow = make_allow_list(metrics=self.metrics, redis=self.redis)
        # where the process is in its drain: /readyz and the servers read this one object
        self.lifecycle = Lifecycle()
        self.monitor = HealthMonitor(
            settings, metrics=self.metrics, redis=self.redis, lifecycle=self.lifecycle
        )
        self.snapshot = Snapshot(
            settings,
            {
                name: UpstreamState(name, up, self.metrics, self.log)
                for name, up in cfg.upstreams.items()
            },
        )
        # open WebSockets by client key: a ban, a deny-list reload, the idle timeout and
        # the drain reach them through it
        self.websockets = WebSocketRegistry(self.log)
        # requests in flight per key of the concurrency policies (per replica, kept
        # across reloads: the requests that hold them end after it)
        self.inflight_keys = InflightCounts()
        self.bans.add_ban_listener(self._banned)
        self._requests: dict[tuple[str, str, int], Counter] = {}
        # by route: its duration histogram, window series and last requests_total child
        self._figures: dict[str, RouteFigures] = {}
        # the routes configured now, and those a reload removed (not configured again)
        self._configured: set[str] = {r.name for r in cfg.routes}
        self._removed: set[str] = set()
        # rl_counters' made ones, by policy (read directly on every allowed decision)
        self.rl_by_policy: dict[str, tuple[Counter, Counter, Counter]] = {}
        self._retired: set[asyncio.Task[None]] = set()
        # the operator page's figures (GET /admin/stats), by route; unix time
        self.route_series: dict[str, RouteSeries] = {}
        self.top_limited = TopKeys()
        # spans of sampled requests, to an OTLP collector (restart-only: a thread and a
        # connection of their own)
        self.spans: SpanExport | None = None
        if cfg.tracing.otlp_endpoint is not None:
            from gateway.tracing import SpanExport  # noqa: PLC0415 - the optional extra

            self.spans = SpanExport(
                cfg.tracing.otlp_endpoint, max_per_s=cfg.tracing.max_spans_per_s
            )
        # a switch for bench/inprocess.py alone: the cost of the per-route figures
        self.window_stats = True
        self.config_generation = 1  # configs applied since start, the first one included
        # the last reload: (result "success" or "failure", unix time, first error or None)
        self.last_reload: tuple[str, float, str | None] | None = None
        # called with the new settings once a reload has been applied (the servers need
        # none: they read the current snapshot)
        self.on_apply: list[Callable[[Settings], None]] = []

    @property
    def upstreams(self) -> Mapping[str, UpstreamState]:
        """The current upstreams by name (a request reads its own snapshot's instead)."""
        return self.snapshot.upstreams

    async def start(self) -> None:
        self.access_log.start()
        await self.limiter.start()
        await self.bans.start()
        await self.allow.start()
        await self.monitor.start()
        self.websockets.start(self._ws_sweep_interval, self._ws_sweep)

    async def close(self) -> None:
        await self.websockets.stop()
        await self.monitor.close()
        await self.allow.close()
        await self.bans.close()
        await self.limiter.close()
        for up in self.upstreams.values():
            await up.close()
        retired = list(self._retired)
        for task in retired:
            task.cancel()
        await asyncio.gather(*retired, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()
        if self.spans is not None:  # what is queued is sent, on the SDK's thread
            await self.spans.aclose()
        self.access_log.close()

    # ------------------------------------------------------------------ reload

    def apply(self, settings: Settings) -> list[str]:
        """Swap in a new config; return what changed that needs a restart to apply."""
        old = self.settings.config
        cfg = settings.config
        needs_restart = [
            name
            for name, a, b in (
                ("listen", old.listen, cfg.listen),
                ("admin", old.admin, cfg.admin),
                ("rate_limit.backend", old.rate_limit.backend, cfg.rate_limit.backend),
                (
                    "rate_limit.redis_url_env",
                    old.rate_limit.redis_url_env,
                    cfg.rate_limit.redis_url_env,
                ),
                (
                    "request.max_header_bytes",
                    old.request.max_header_bytes,
                    cfg.request.max_header_bytes,
                ),
                (
                    "tracing.otlp_endpoint",
                    old.tracing.otlp_endpoint,
                    cfg.tracing.otlp_endpoint,
                ),
            )
            if a != b
        ]
        upstreams: dict[str, UpstreamState] = {}
        for name, up_cfg in cfg.upstreams.items():
            state = self.upstreams.get(name)
            if state is None or not state.reconfigure(up_cfg):
                old_state = state
                state = UpstreamState(name, up_cfg, self.metrics, self.log)
                if old_state is not None:
                    self._retire(old_state, up_cfg.timeout_s)
                    state.keep_learned(old_state)
            upstreams[name] = state
        for name, state in self.upstreams.items():
            if name not in upstreams:
                self._retire(state, state.config.timeout_s)
        snapshot = Snapshot(settings, upstreams)
        self.limiter.reconfigure(rates_from_config(cfg.rate_limit))
        self.bans.reconfigure(cfg.abuse)
        rate = failure_rate(cfg.identity)
        if rate is None:
            self.verify_failures = None
        elif self.verify_failures is None:
            self.verify_failures = FailureBudget(rate)
        else:
            self.verify_failures.reconfigure(rate)
        self.monitor.reconfigure(settings)
        if self.spans is not None:
            self.spans.set_rate(cfg.tracing.max_spans_per_s)
        # one assignment: a request that started keeps the snapshot (and upstreams) it read
        self.snapshot = snapshot
        self._forget_routes({r.name for r in cfg.routes})
        self.settings = settings
        self.config_generation += 1
        # a client the new lists deny loses its WebSockets now
        self.websockets.sweep(asyncio.get_running_loop().time(), snapshot, self.bans, lists=True)
        for listener in self.on_apply:
            try:
                listener(settings)
            except Exception:  # the config is applied: a listener's bug must not undo that
                self.log.exception("config_listener_failed")
        return needs_restart

    def _forget_routes(self, kept: set[str]) -> None:
        """The figures of routes no longer configured leave the operator's page (requests
        that matched no route, ``none``, stay). Their Prometheus series stay: counters
        that vanish would read as resets."""
        self._removed = (self._removed | self._configured) - kept
        self._configured = kept
        for name in [n for n in self.route_series if n not in kept and n != NO_ROUTE]:
            del self.route_series[name]
        for name in [n for n in self._figures if n not in kept and n != NO_ROUTE]:
            del self._figures[name]

    # ------------------------------------------------------------------ websockets

    def _banned(self, key: str) -> None:
        self.websockets.on_ban(key, self.bans)

    def _ws_sweep_interval(self) -> float:
        return sweep_interval_s(self.settings.config.websocket.idle_timeout_s)

    def _ws_sweep(self) -> None:
        now = asyncio.get_running_loop().time()
        self.websockets.sweep(now, self.snapshot, self.bans)

    def _retire(self, state: UpstreamState, grace_s: float) -> None:
        async def later() -> None:
            try:
                await asyncio.sleep(grace_s + 1)
                # its WebSockets end as WebSockets do (closed, banned, idle, the drain);
                # closing the pool under them would cut them
                while state.websockets:  # noqa: ASYNC110 - a count, polled while retired
                    await asyncio.sleep(1)
            finally:  # also when the runtime closes first
                await state.close()

        task = asyncio.ensure_future(later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    # ------------------------------------------------------------------ metrics

    def count_request(
        self, route: str, method: str, status: int, duration: float, now: float = 0.0
    ) -> None:
        """One answered request in the metrics and the route's figures; ``now`` is the
        unix time it ended (0: read the clock)."""
        figures = self._figures.get(route)
        if figures is None:
            if route in self._removed:
                # answered after the reload that removed its route (it began before):
                # counted, but the route does not come back to the operator's page
                self.metrics.requests_total.labels(route, method, str(status)).inc()
                self.metrics.request_duration.labels(route).observe(duration)
                return
            figures = self._figures[route] = RouteFigures(
                self.metrics.request_duration.labels(route)
            )
        # most requests of a route repeat its last method and status: no key to build
        child = figures.requests
        if child is None or status != figures.status or method != figures.method:
            key = (route, method, status)
            child = self._requests.get(key)
            if child is None:
                child = self._requests[key] = self.metrics.requests_total.labels(
                    route, method, str(status)
                )
            figures.requests = child
            figures.status = status
            figures.method = method
        child.inc()
        figures.duration.observe(duration)
        if self.window_stats:
            series = figures.series
            if series is None:
                series = self.route_series.get(route)
                if series is None:
                    series = self.route_series[route] = RouteSeries()
                figures.series = series
            series.record(now or _time(), status, duration)

    def count_identity(self, kind: str, result: str) -> None:
        """One credential's outcome (``result`` is ``valid`` or a refusal's short reason:
        a bounded set, never the credential)."""
        key = (kind, result)
        child = self._identity_counts.get(key)
        if child is None:
            child = self._identity_counts[key] = self.metrics.identity_verifications.labels(
                kind, result
            )
        child.inc()

    def rl_counters(self, policy: str) -> tuple[Counter, Counter, Counter]:
        found = self.rl_by_policy.get(policy)
        if found is None:
            m = self.metrics.ratelimit_decisions
            found = self.rl_by_policy[policy] = (
                m.labels(policy, "allowed"),
                m.labels(policy, "limited"),
                m.labels(policy, "shadow_limited"),
            )
        return found

    def metrics_response(self) -> web.Response:
        resp = web.Response(body=self.metrics.exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp
