"""Retry math: jittered exponential backoff and a retry budget (pure, clock passed in).

SPEC section 3 ``upstreams.*.retries``: only idempotent methods are retried, and only
when nothing was sent upstream yet.  The budget caps retries at ``budget_ratio`` of the
recent requests, so that retries cannot multiply the load on an upstream that is
already failing, with a small floor (``min_retries_per_s``) so that a quiet upstream
can still retry a lone failed request.
"""

from __future__ import annotations

from gateway.config import Retries
from gateway.core.breaker import RollingCounts

__all__ = ["IDEMPOTENT_METHODS", "RetryBudget", "backoff_s"]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

_MAX_EXPONENT = 62  # 2**62 * any sane backoff_s is far above any backoff_max_s
_EPSILON = 1e-9


def backoff_s(attempt: int, cfg: Retries, rand: float) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    Full jitter: ``rand`` (uniform in [0, 1), e.g. ``random.random()``) times
    ``min(backoff_max_s, backoff_s * 2**attempt)``.
    """
    exp = min(max(attempt, 0), _MAX_EXPONENT)
    cap = min(cfg.backoff_max_s, cfg.backoff_s * (1 << exp))
    return min(max(rand, 0.0), 1.0) * cap


class RetryBudget:
    """Retries allowed over a rolling window: ``ratio * requests + min_retries_per_s * window_s``.

    Call :meth:`record_request` once per client request (not per attempt) and
    :meth:`record_retry` for each retry actually made.  With the defaults a window of
    10 s always allows one retry, however quiet the upstream.
    """

    __slots__ = ("_counts", "_floor", "ratio", "window_s")

    def __init__(self, ratio: float, window_s: float = 10, min_retries_per_s: float = 0.1) -> None:
        if ratio < 0 or window_s <= 0 or min_retries_per_s < 0:
            raise ValueError("ratio and min_retries_per_s must be >= 0, window_s > 0")
        self.ratio = ratio
        self.window_s = window_s
        self._floor = min_retries_per_s * window_s
        self._counts = RollingCounts(window_s)  # total = requests, marked = retries

    def record_request(self, now: float) -> None:
        self._counts.add(now, 1, 0)

    def record_retry(self, now: float) -> None:
        self._counts.add(now, 0, 1)

    def can_retry(self, now: float) -> bool:
        """Would one more retry stay within the budget?"""
        requests, retries = self._counts.sums(now)
        return retries + 1 <= self.ratio * requests + self._floor + _EPSILON

    def reconfigure(self, ratio: float) -> None:
        self.ratio = ratio
