"""What the Redis limiter does while Redis fails: the fallback and the breaker.

Every decision a round trip failed for (timeout, connection error, error reply) and
every decision made while the breaker is open counts once in
``gateway_ratelimit_backend_errors_total`` and is answered as ``on_backend_error`` says:
``local``: a :class:`MemoryLimiter` with each rate divided by the number of live
replicas (:mod:`gateway.stores.redis.replicas`); ``allow``: allowed; ``deny``:
:class:`BackendUnavailable` from ``decide``.

A round trip is bounded by ``timeout_s`` (250 ms) from the moment the first decision of
its batch was queued, whatever Redis does (on the lean connection, a round trip past
its deadline drops the connection, failing every round trip still on it; the next one
reconnects: a stuck or half-open connection is not reused).  After
``breaker_failures`` failed round trips in a row, Redis is skipped for
``breaker_open_s``; then one round trip probes it while the others keep using the
fallback; its success closes the breaker.  The client reconnects by itself.
``redis_unavailable`` is logged once when Redis starts failing, ``redis_recovered``
once when a round trip succeeds again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from gateway.core.gcra import Decision
from gateway.metrics import Metrics
from gateway.stores.limiter import BackendUnavailable, Check, Clock, unlimited
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.redis.batch import Batch
from gateway.stores.redis.replicas import Replicas

__all__ = ["OnBackendError", "OutageHandling"]

OnBackendError = Literal["local", "allow", "deny"]


class OutageHandling:
    """The breaker and fallback half of :class:`~gateway.stores.redis.limiter.RedisLimiter`.

    A mixin rather than an object of its own: the limiter's hot path reads the breaker
    state (``_open_until``, ``_probing``) on every decision, as plain attributes.
    """

    _clock: Clock
    _log: Any
    _metrics: Metrics
    _on_error: OnBackendError
    _fallback: MemoryLimiter | None
    _replicas: Replicas
    _breaker_failures: int
    _breaker_open_s: float
    _ok: bool
    _failures: int
    _open_until: float
    _probing: bool

    def _init_breaker(self, failures: int, open_s: float) -> None:
        """Closed: Redis is tried; ``failures`` in a row open it for ``open_s``."""
        self._breaker_failures = failures
        self._breaker_open_s = open_s
        self._ok = True
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    def _fail_batch(self, batch: Batch, exc: Exception) -> None:
        self._on_failure(exc)
        now = self._clock()
        futures = [p.future for p in batch.parts if not p.future.done()]
        if not futures:
            return
        if self._on_error == "deny":
            self._metrics.ratelimit_backend_errors.inc(len(batch.keys))
            retry_after = self._retry_after(now)
            for future in futures:
                future.set_exception(BackendUnavailable(retry_after))
            return
        batch.settle(self._fallback_decisions(batch.sent_checks()))

    def _may_try_redis(self, now: float) -> bool:
        """Whether a decision may go to Redis now (breaker closed, or a probe is due)."""
        return now >= self._open_until and not self._probing

    def _on_failure(self, exc: BaseException) -> None:
        self._probing = False
        self._failures += 1
        if self._ok:
            self._ok = False
            self._log.warning(
                "redis_unavailable",
                component="ratelimit",
                error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                fallback=self._on_error,
            )
        if self._failures >= self._breaker_failures:
            self._open_until = self._clock() + self._breaker_open_s

    def _on_success(self) -> None:
        if self._ok and not (self._failures or self._open_until or self._probing):
            return  # the usual case, once per batch
        self._probing = False
        self._failures = 0
        self._open_until = 0.0
        if not self._ok:
            self._ok = True
            self._log.info("redis_recovered", component="ratelimit")

    def _retry_after(self, now: float) -> float:
        return max(1.0, self._open_until - now)

    def _fallback_or_raise(self, checks: Sequence[Check], now: float) -> list[Decision]:
        if self._on_error == "deny":
            self._metrics.ratelimit_backend_errors.inc(len(checks))
            raise BackendUnavailable(self._retry_after(now))
        return self._fallback_decisions(checks)

    def _fallback_decisions(self, checks: Sequence[Check]) -> list[Decision]:
        self._metrics.ratelimit_backend_errors.inc(len(checks))
        if self._fallback is not None:
            return self._fallback.decide_local(self._replicas.divided_checks(checks))
        return [unlimited(c.rate, c.cost) for c in checks]
