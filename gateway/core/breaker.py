"""Circuit breaker: the pure state machine, with the clock passed in.

States (SPEC section 3, ``upstreams.*.circuit_breaker``):

- ``closed``: every request goes to the upstream.  Outcomes are counted in a rolling
  window of ``window_s`` made of :data:`BUCKETS` time buckets (O(1) per outcome).  The
  breaker opens on ``consecutive_failures`` failures in a row, or when the window holds
  at least ``min_requests`` outcomes and the failed share reaches ``failure_ratio``.
- ``open``: every request is refused (503 with ``Retry-After``) for ``open_s``.
- ``half_open``: once ``open_s`` has elapsed, :meth:`Breaker.acquire` lets at most
  ``half_open_requests`` trial requests through.  When all of them succeed the breaker
  closes (with a fresh window); the first failure opens it again for ``open_s``.

Reading the state never changes it: an ``open`` breaker whose ``open_s`` has elapsed
reads as ``half_open``, but the transition itself happens in :meth:`Breaker.acquire`.

Every acquired request must end in :meth:`Breaker.record` (or :meth:`Breaker.release`
when it ended without a verdict, e.g. the client went away).  As a safety net, trial
slots of a half-open breaker that got no verdict within ``open_s`` of the last trial
are given back, so a lost trial can never keep an upstream cut off for good.
Outcomes recorded while the breaker is ``open`` (requests admitted before it opened)
are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum

from gateway.config import CircuitBreaker

__all__ = ["BUCKETS", "Breaker", "RollingCounts", "State"]

BUCKETS = 10
"""Time buckets a rolling window is cut into."""


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class RollingCounts:
    """Two counters (``total`` and ``marked``) over a rolling time window.

    The window is cut into ``buckets`` slots of ``window_s / buckets`` seconds; adding
    and reading cost O(``buckets``) at worst, independent of the traffic.  The sums cover
    the current slot and the ``buckets - 1`` before it, i.e. between
    ``window_s * (buckets - 1) / buckets`` and ``window_s`` seconds of history.
    """

    __slots__ = (
        "_epoch",
        "_index",
        "_marked",
        "_marked_sum",
        "_next_at",
        "_total",
        "_total_sum",
        "_width",
    )

    def __init__(self, window_s: float, buckets: int = BUCKETS) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be > 0 and buckets >= 1")
        self._width = window_s / buckets
        self._total = [0] * buckets
        self._marked = [0] * buckets
        self._total_sum = 0
        self._marked_sum = 0
        self._epoch: int | None = None
        # the current slot, and the instant the next one starts: adding within a slot is
        # an index, not a division (the slot's math is done once per slot)
        self._index = 0
        self._next_at = -math.inf

    def reset(self) -> None:
        n = len(self._total)
        self._total = [0] * n
        self._marked = [0] * n
        self._total_sum = 0
        self._marked_sum = 0
        self._epoch = None
        self._next_at = -math.inf

    def _advance(self, now: float) -> int:
        epoch = math.floor(now / self._width)
        last = self._epoch
        if last is None:
            self._set_epoch(epoch)
            return epoch
        if epoch <= last:  # same bucket, or a clock that went back: stay in the newest one
            return last
        n = len(self._total)
        if epoch - last >= n:
            self.reset()
        else:
            for e in range(last + 1, epoch + 1):
                i = e % n
                self._total_sum -= self._total[i]
                self._marked_sum -= self._marked[i]
                self._total[i] = 0
                self._marked[i] = 0
        self._set_epoch(epoch)
        return epoch

    def _set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._index = epoch % len(self._total)
        self._next_at = (epoch + 1) * self._width

    def add(self, now: float, total: int = 1, marked: int = 0) -> None:
        # before the next slot starts: the current one (a clock that went back stays there)
        i = self._index if now < self._next_at else self._advance(now) % len(self._total)
        self._total[i] += total
        self._marked[i] += marked
        self._total_sum += total
        self._marked_sum += marked

    def sums(self, now: float) -> tuple[int, int]:
        """``(total, marked)`` over the window ending at ``now``."""
        self._advance(now)
        return self._total_sum, self._marked_sum


class Breaker:
    """One upstream's circuit breaker.  Not thread-safe; one event loop owns it."""

    __slots__ = (
        "_cfg",
        "_consecutive",
        "_failure_statuses",
        "_last_trial_at",
        "_on_transition",
        "_opened_at",
        "_state",
        "_trial_successes",
        "_trials",
        "_window",
    )

    def __init__(
        self,
        cfg: CircuitBreaker,
        on_transition: Callable[[State, State], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._failure_statuses = frozenset(cfg.failure_statuses)
        self._on_transition = on_transition
        self._window = RollingCounts(cfg.window_s)
        self._state = State.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trials = 0
        self._trial_successes = 0
        self._last_trial_at = 0.0

    @property
    def config(self) -> CircuitBreaker:
        return self._cfg

    # ------------------------------------------------------------------ reading

    def state(self, now: float) -> State:
        """The state as a client would see it at ``now``; never changes anything."""
        if self._state is State.OPEN and now - self._opened_at >= self._cfg.open_s:
            return State.HALF_OPEN
        return self._state

    def retry_after(self, now: float) -> float:
        """Seconds until a request may pass again (0 when one may pass now).

        While half-open with every trial slot taken the answer is one second (capped
        at ``open_s``): the trials in flight decide soon.
        """
        st = self._state
        if st is State.CLOSED:
            return 0.0
        if st is State.OPEN:
            return max(0.0, self._opened_at + self._cfg.open_s - now)
        if self._trials < self._cfg.half_open_requests or self._trials_stale(now):
            return 0.0
        return min(1.0, self._cfg.open_s)

    def is_failure(self, status: int | None, duration_s: float) -> bool:
        """Whether an exchange counts as a failure.

        ``status`` None means no response (connect error, reset, timeout).
        """
        if status is None or status in self._failure_statuses:
            return True
        slow = self._cfg.slow_call_s
        return slow is not None and duration_s > slow

    # ------------------------------------------------------------------ deciding

    def acquire(self, now: float) -> bool:
        """May a request go to the upstream now?  A True must be followed by ``record``."""
        st = self._state
        if st is State.CLOSED:
            return True
        if st is State.OPEN:
            if now - self._opened_at < self._cfg.open_s:
                return False
            self._to_half_open()
        elif self._trials_stale(now):
            self._trials = self._trial_successes
        if self._trials >= self._cfg.half_open_requests:
            return False
        self._trials += 1
        self._last_trial_at = now
        return True

    def release(self, now: float) -> None:  # noqa: ARG002 - same shape as record()
        """An acquired request ended without a verdict: give its trial slot back."""
        if self._state is State.HALF_OPEN and self._trials > self._trial_successes:
            self._trials -= 1

    def record(self, now: float, *, failure: bool) -> None:
        """The outcome of a request :meth:`acquire` let through."""
        st = self._state
        if st is State.CLOSED:
            self._window.add(now, 1, 1 if failure else 0)
            if not failure:
                self._consecutive = 0
                return
            self._consecutive += 1
            cfg = self._cfg
            if self._consecutive >= cfg.consecutive_failures:
                self._to_open(now)
                return
            total, failed = self._window.sums(now)
            if total >= cfg.min_requests and failed / total >= cfg.failure_ratio:
                self._to_open(now)
        elif st is State.HALF_OPEN:
            if failure:
                self._to_open(now)
                return
            self._trial_successes += 1
            if self._trial_successes >= self._cfg.half_open_requests:
                self._to_closed()
        # OPEN: a late outcome of a request admitted before the breaker opened.

    def reconfigure(self, cfg: CircuitBreaker) -> None:
        """Apply a new config, keeping the state (a new ``window_s`` starts a new window)."""
        if cfg.window_s != self._cfg.window_s:
            self._window = RollingCounts(cfg.window_s)
        self._cfg = cfg
        self._failure_statuses = frozenset(cfg.failure_statuses)

    # ------------------------------------------------------------------ transitions

    def _trials_stale(self, now: float) -> bool:
        return (
            self._trials > self._trial_successes and now - self._last_trial_at >= self._cfg.open_s
        )

    def _transition(self, to: State) -> None:
        frm = self._state
        self._state = to
        if self._on_transition is not None:
            self._on_transition(frm, to)

    def _to_open(self, now: float) -> None:
        self._opened_at = now
        self._trials = 0
        self._trial_successes = 0
        self._transition(State.OPEN)

    def _to_half_open(self) -> None:
        self._trials = 0
        self._trial_successes = 0
        self._transition(State.HALF_OPEN)

    def _to_closed(self) -> None:
        self._window.reset()
        self._consecutive = 0
        self._trials = 0
        self._trial_successes = 0
        self._transition(State.CLOSED)
