"""The limiter of ``rate_limit.backend: redis`` when no Redis URL is set."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from gateway.core.gcra import Decision, Rate
from gateway.metrics import Metrics
from gateway.stores.limiter import BackendUnavailable, Check, Clock, Limiter, unlimited
from gateway.stores.memory.limiter import MemoryLimiter

__all__ = ["NoRedisLimiter"]


class NoRedisLimiter(Limiter):
    """The redis backend with no Redis URL set: every decision is a backend error.

    What follows is ``on_backend_error``: ``deny`` refuses (503), ``allow`` lets all
    through, ``local`` applies the limits in this process alone.
    """

    RETRY_AFTER_S = 2.0

    def __init__(
        self,
        rates: Mapping[str, Rate],
        *,
        metrics: Metrics,
        on_backend_error: str,
        max_keys: int = 1_000_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._deny = on_backend_error == "deny"
        self._local = (
            MemoryLimiter(rates, max_keys=max_keys, clock=clock)
            if on_backend_error == "local"
            else None
        )

    def _answer(self, checks: Sequence[Check], *, commit: bool) -> list[Decision]:
        if commit:  # counted as the Redis backend counts them: decisions, not peeks
            self._metrics.ratelimit_backend_errors.inc(len(checks))
        if self._deny:
            raise BackendUnavailable(self.RETRY_AFTER_S)
        if self._local is not None:
            local = self._local
            return local.decide_local(checks) if commit else local.peek_local(checks)
        return [unlimited(c.rate, c.cost) for c in checks]

    def decide_local(self, checks: Sequence[Check]) -> list[Decision] | None:
        return None if self._deny else self._answer(checks, commit=True)

    async def decide(self, checks: Sequence[Check]) -> list[Decision]:
        return self._answer(checks, commit=True)

    async def peek(self, checks: Sequence[Check]) -> list[Decision]:
        return self._answer(checks, commit=False)

    def reconfigure(self, rates: Mapping[str, Rate]) -> None:
        if self._local is not None:
            self._local.reconfigure(rates)

    async def start(self) -> None:
        if self._local is not None:
            await self._local.start()  # its sweep of refilled keys

    async def close(self) -> None:
        if self._local is not None:
            await self._local.close()

    @property
    def backend_ok(self) -> bool:
        return False
