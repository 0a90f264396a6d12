"""Where rate-limit and abuse state lives: this process or Redis shared by every replica.

The interfaces are :mod:`gateway.stores.limiter` and :mod:`gateway.stores.bans`; the
backends sit in :mod:`gateway.stores.memory` and :mod:`gateway.stores.redis`, and the
factories here pick one per config, so no base module imports a backend. The Redis
backends (and redis-py with them) are imported only when a config asks for one: every
``gateway.stores.*`` import runs this module, and a memory-backend gateway starts faster
without them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.config import Abuse, RateLimit
from gateway.metrics import Metrics
from gateway.stores.allow import AllowList
from gateway.stores.bans import BanStore
from gateway.stores.limiter import Clock, Limiter, rates_from_config
from gateway.stores.memory.bans import MemoryBanStore
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.noredis import NoRedisLimiter

__all__ = ["make_allow_list", "make_ban_store", "make_limiter"]


def make_limiter(
    cfg: RateLimit,
    redis_url: str | None,
    *,
    metrics: Metrics,
    redis: object | None = None,
    clock: Clock = time.monotonic,
    key_prefix: str = "gw:",
) -> Limiter:
    """The limiter for ``cfg.backend``.

    ``redis`` is an existing client (from :func:`gateway.stores.redis.client.make_redis`)
    to share; otherwise one is made from ``redis_url``.  ``key_prefix`` starts every
    Redis key (two deployments sharing a Redis give different prefixes).
    """
    rates = rates_from_config(cfg)
    if cfg.backend == "memory":
        return MemoryLimiter(rates, max_keys=cfg.max_keys, clock=clock)

    if redis is None and not redis_url:
        # the config loader warned about the unset variable: on_backend_error applies
        return NoRedisLimiter(
            rates, metrics=metrics, on_backend_error=cfg.on_backend_error, max_keys=cfg.max_keys
        )

    from gateway.stores.redis.limiter import RedisLimiter  # noqa: PLC0415 - redis only

    return RedisLimiter(
        rates,
        redis_url=redis_url,
        redis=redis,
        metrics=metrics,
        on_backend_error=cfg.on_backend_error,
        max_keys=cfg.max_keys,
        clock=clock,
        key_prefix=key_prefix,
    )


def make_ban_store(
    cfg: Abuse,
    *,
    metrics: Metrics,
    redis: Any | None = None,
    clock: Callable[[], float] = time.time,
    key_prefix: str = "gw:",
) -> BanStore:
    """The ban store for this process: shared through ``redis`` (an already-built
    ``redis.asyncio`` ``Redis`` or ``RedisCluster`` client) when given, else in memory.
    ``key_prefix`` starts every Redis key (``gw:`` by default)."""
    if redis is None:
        return MemoryBanStore(cfg, metrics=metrics, clock=clock)
    from gateway.stores.redis.bans import RedisBanStore  # noqa: PLC0415 - redis only

    return RedisBanStore(cfg, metrics=metrics, redis=redis, clock=clock, key_prefix=key_prefix)


def make_allow_list(
    *, metrics: Metrics, redis: Any | None = None, key_prefix: str = "gw:"
) -> AllowList:
    """The break-glass allow list: shared through ``redis`` when given (as bans are),
    else of this process only."""
    if redis is None:
        return AllowList(metrics=metrics)
    from gateway.stores.redis.allow import RedisAllowList  # noqa: PLC0415 - redis only

    return RedisAllowList(metrics=metrics, redis=redis, key_prefix=key_prefix)
