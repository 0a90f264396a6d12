"""Overload protection: the pure decisions of SPEC section 10, with the clock passed in.

Two pieces, apart from any I/O:

- :func:`admits`: whether a request of a priority may start now, given the upstream's
  in-flight counts, its concurrency limit and its hard cap (``max_inflight``).
- :class:`GradientLimit`: the adaptive limit, learned from latency.

The adaptive limit is a gradient over the upstream's no-load latency, in the family of
TCP Vegas, Netflix's concurrency-limits ``GradientLimit`` and Envoy's adaptive
concurrency filter:

- Completed requests are averaged over short windows (a few no-load round trips).  At the
  end of a window the limit moves to ``limit * gradient + sqrt(limit)``, where
  ``gradient = no_load / window_average`` (kept within 0.5 and 1).  While the average
  stays at the no-load latency the limit grows by its square root a window (seconds from
  ``min`` to a few hundred); as soon as requests queue inside the upstream, its latency
  grows with the queue and the limit falls in proportion.  The fixed point sits a square
  root above the upstream's real concurrency: a short queue that keeps it busy, and
  requests that wait about ``sqrt(limit) / limit`` of a service time.  A sample counts
  for at most twice the no-load latency (where the gradient reaches its floor), so a
  few requests slow by nature cannot pass for a queue: under a real queue every
  request is slower, and the average still reaches the floor.
- The no-load latency is the lowest window average seen, so an upstream that gets faster
  is followed at once.  Under a steady load no window is ever free of the queue the
  limit keeps, so that minimum would go stale, and it could not follow an upstream that
  got slower for good.  So, like Envoy, the limit measures it again: every
  ``probe_interval_s`` of load it admits half the limit for a moment (the upstream then
  runs below its real concurrency, with no queue), takes the average latency of the
  requests admitted in that moment as the new no-load latency, and goes back.  Unlike
  Envoy it halves the limit instead of pinning it to ``min``: half of a limit that sits
  a square root above the real concurrency is below it, which is all the probe needs,
  and the flood loses a few per cent of one probe's moment instead of almost all of it.
  An idle or lightly loaded upstream is never probed: its windows already show its
  no-load latency, and nothing is ever refused for a probe.  A limit that has halved
  since the last probe probes again (``REBASE_GAP_S`` after it at the soonest): either
  the upstream got slower, and its no-load latency is to be measured anew anyway, or
  the figure in force is wrong for another reason (a delay of the gateway's own that
  the lag below does not show), and a probe measures it again.
- The latencies the gateway measures include its own delay: a loop busy with a flood
  (its CPU taken by the flood, by its neighbours, by a throttling quota) reads every
  answer late, by about its lag, and a no-load figure learned while it was quieter
  would read that as a queue in the upstream.  Refusing then does not help: the gateway
  is the bottleneck, and a 503 costs it about the CPU of a forwarded request.  So each
  sample comes with the event loop's lag at the time (``delay_s``); the no-load latency
  is kept with the average lag of the moment it was measured, and a window's samples
  are compared with it less the lag's growth since: a rise that growth explains moves
  nothing, a real queue in the upstream still lowers the limit, however busy the
  gateway.  The no-load figure itself is learned from the latencies as measured, not
  less the lag: the lag is one reading a quarter of a second, not each answer's delay,
  and a minimum over windows less a noisy reading keeps the reading that overstated
  the delay most (over real sockets, that shed more than not knowing the lag at all).
  For the same reason a lag lower than at the no-load moment is not added back: the
  noise then only ever errs towards a higher limit, by at most the lag's growth.
  Freezing decreases while the lag is high (the other way to read a busy gateway) would
  leave the upstream unprotected exactly when a flood both saturates the gateway and
  queues in the upstream.
- A request over the limit waits once, the no-load latency at most
  (:attr:`GradientLimit.refusal_wait_s`), and is checked again before it is refused:
  a closed-loop flood refused at once sends again at once, and its refusals take the
  CPU whose delay the limit would then learn.

Netflix's Gradient2 follows a long average of the latency instead of a minimum and
reacts to changes of it, not to its level: a flood that grows slowly drives it to its
maximum, with the upstream's queue (and every request's latency) growing with it.  AIMD
needs a drop or a timeout to back off, by then the queue is long.  Neither keeps the
latency near the no-load figure, which is what a critical route needs.

Every method is O(1); the gateway calls :meth:`GradientLimit.on_sample` once a request.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Final

__all__ = ["GradientLimit", "Priority", "admits", "critical_reserve"]


class Priority(IntEnum):
    """A route's priority; a higher value is refused later."""

    BULK = 0
    NORMAL = 1
    CRITICAL = 2


def critical_reserve(limit: int) -> int:
    """What ``normal`` leaves free for ``critical`` on an upstream a critical route uses."""
    return max(1, limit // 10)


def admits(
    priority: Priority,
    *,
    inflight: int,
    critical_inflight: int,
    limit: int,
    cap: int,
    reserve: int,
) -> bool:
    """Whether a request may start now (SPEC section 10).

    ``inflight`` counts every priority, ``critical_inflight`` the critical ones; ``limit``
    is the concurrency limit (``cap`` in fixed mode), ``cap`` the hard ``max_inflight``;
    ``reserve`` is :func:`critical_reserve` on an upstream a critical route uses, else 0.
    Any request starts on an upstream with nothing in flight, so a limit can never shut
    an upstream off (below the hard cap, which is at least 1).
    """
    if inflight == 0:
        return True
    if inflight >= cap:
        return False
    if priority is Priority.CRITICAL:
        return critical_inflight < limit
    if priority is Priority.NORMAL:
        return inflight < limit - reserve
    return inflight * 2 < limit


class GradientLimit:
    """An upstream's concurrency limit, learned from the latency of its requests.

    ``limit`` is what admission reads; it stays within ``minimum`` and ``maximum``.
    Feed it every completed request with :meth:`on_sample` (its latency, the time it
    ended, and the in-flight count it started with).  Requests that failed without an
    answer (connect errors) are better left out: their latency says nothing of the
    upstream's queue.
    """

    __slots__ = (
        "_count",
        "_delay_sum",
        "_estimate",
        "_loaded",
        "_no_load",
        "_no_load_delay",
        "_phase_started",
        "_probe_count",
        "_probe_delay_sum",
        "_probe_due",
        "_probe_ended",
        "_probe_limit",
        "_probe_sum",
        "_raw_sum",
        "_rebase_from",
        "_sum",
        "_window_end",
        "limit",
        "maximum",
        "minimum",
        "probe_interval_s",
    )

    WINDOW_ROUND_TRIPS: Final = 4
    """A window lasts this many no-load latencies ..."""
    MIN_WINDOW_S: Final = 0.05
    MAX_WINDOW_S: Final = 1.0
    """... within these bounds ..."""
    MIN_SAMPLES: Final = 8
    """... and holds at least this many requests (a quiet upstream's window is longer)."""
    PROBE_SAMPLES: Final = 8
    """Requests whose average latency is the probe's no-load latency."""
    PROBE_TIMEOUT_S: Final = 2.0
    """A probe that has not got its samples by then gives up (the old figure stays)."""
    INITIAL: Final = 20
    SAMPLE_CAP: Final = 2.0
    """A sample counts for at most this many no-load latencies (1 / the gradient's floor)."""
    REBASE_GAP_S: Final = 1.0
    """A limit halved since the last probe probes again, this long after it at the soonest."""
    MAX_REFUSAL_WAIT_S: Final = 0.25
    """A slow upstream's refusals still come within this (a client waits for its 503)."""

    def __init__(
        self,
        *,
        minimum: int,
        maximum: int,
        now: float,
        probe_interval_s: float = 10.0,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum} and {maximum}")
        if probe_interval_s <= 0:
            raise ValueError("probe_interval_s must be positive")
        self.minimum = minimum
        self.maximum = maximum
        self.probe_interval_s = probe_interval_s
        self._estimate = float(min(maximum, max(minimum, self.INITIAL)))
        self.limit = int(self._estimate)
        self._no_load = math.inf
        self._no_load_delay = 0.0  # the gateway's own delay when no_load was measured
        self._sum = 0.0  # latencies less the growth of the gateway's own delay (capped)
        self._raw_sum = 0.0  # latencies as measured (capped): the no-load figure's
        self._delay_sum = 0.0
        self._count = 0
        self._loaded = False
        self._window_end = math.inf
        self._probe_due = now + probe_interval_s
        self._phase_started = math.inf  # when the probe in progress began
        self._probe_limit = 0
        self._probe_sum = 0.0
        self._probe_delay_sum = 0.0
        self._probe_count = 0
        self._probe_ended = -math.inf
        self._rebase_from = self._estimate

    @property
    def no_load_s(self) -> float:
        """The no-load latency in force (``inf`` before the first window)."""
        return self._no_load

    @property
    def refusal_wait_s(self) -> float:
        """How long a request over the limit may wait for room before it is refused: the
        no-load latency (SPEC section 10 allows no longer), at most ``MAX_REFUSAL_WAIT_S``;
        0 before the first window has measured it."""
        if self._no_load == math.inf:
            return 0.0
        return min(self._no_load, self.MAX_REFUSAL_WAIT_S)

    @property
    def probing(self) -> bool:
        return self._phase_started != math.inf

    def on_sample(self, latency_s: float, now: float, inflight: int, delay_s: float = 0.0) -> None:
        """One completed request: its latency, when it ended, the in-flight count when
        it was admitted (itself included), and the gateway's own delay at the time (its
        event loop's lag: how late it reads an answer that has come).  Only the growth of
        that delay since the no-load latency was measured is taken off the latency."""
        if self._phase_started != math.inf:
            self._probe(latency_s, now, inflight, delay_s)
            return
        # a sample weighs at most twice the no-load latency: past that the gradient is at
        # its floor anyway, and a few requests slow by nature (an export among searches,
        # a client's deliberately costly ones) must not outweigh the many that are not
        cap = self.SAMPLE_CAP * self._no_load
        own = delay_s - self._no_load_delay
        self._sum += min(latency_s - own if own > 0 else latency_s, cap)
        self._raw_sum += min(latency_s, cap)
        self._delay_sum += delay_s
        self._count += 1
        if inflight * 2 >= self.limit:
            self._loaded = True
        if self._window_end == math.inf:
            self._window_end = now + self._window_s()
        if now >= self._window_end and self._count >= self.MIN_SAMPLES:
            self._end_window(now)

    def _window_s(self) -> float:
        if self._no_load == math.inf:
            return self.MIN_WINDOW_S
        span = self._no_load * self.WINDOW_ROUND_TRIPS
        return min(self.MAX_WINDOW_S, max(self.MIN_WINDOW_S, span))

    def _end_window(self, now: float) -> None:
        average = self._sum / self._count
        raw = self._raw_sum / self._count
        delay = self._delay_sum / self._count
        loaded = self._loaded
        self._sum = self._raw_sum = self._delay_sum = 0.0
        self._count = 0
        self._loaded = False
        self._window_end = now + self._window_s()
        if raw < self._no_load:
            self._no_load = raw
            self._no_load_delay = delay
        floor = 1 / self.SAMPLE_CAP
        gradient = min(1.0, max(floor, self._no_load / average)) if average > 0 else 1.0
        estimate = self._estimate * gradient + math.sqrt(self._estimate)
        if not loaded:
            # The upstream was not asked for half the limit: its latency says nothing
            # about a higher one (Netflix's "app-limited" rule), so the limit may only fall.
            estimate = min(estimate, self._estimate)
        self._set(estimate)
        if loaded and (
            now >= self._probe_due
            or (
                self._estimate * 2 <= self._rebase_from
                and now - self._probe_ended >= self.REBASE_GAP_S
            )
        ):
            self._begin_probe(now)

    def _set(self, estimate: float) -> None:
        self._estimate = min(float(self.maximum), max(float(self.minimum), estimate))
        self.limit = int(self._estimate)

    def _begin_probe(self, now: float) -> None:
        self._phase_started = now
        self._probe_limit = max(self.minimum, self.limit // 2)
        self._probe_sum = self._probe_delay_sum = 0.0
        self._probe_count = 0
        self.limit = self._probe_limit

    def _probe(self, latency_s: float, now: float, inflight: int, delay_s: float) -> None:
        # A request admitted during the probe with at most the probe's limit in flight
        # (everything counted, what was admitted before the probe included) found the
        # upstream below its real concurrency: its latency is the no-load latency.
        if now - latency_s >= self._phase_started and inflight <= self._probe_limit:
            self._probe_sum += latency_s
            self._probe_delay_sum += delay_s
            self._probe_count += 1
        if self._probe_count >= self.PROBE_SAMPLES:
            self._no_load = self._probe_sum / self._probe_count
            self._no_load_delay = self._probe_delay_sum / self._probe_count
            self._end_probe(now)
        elif now - self._phase_started >= self.PROBE_TIMEOUT_S:
            self._end_probe(now)

    def _end_probe(self, now: float) -> None:
        self._phase_started = math.inf
        self._probe_ended = now
        self._rebase_from = self._estimate
        self._probe_due = now + self.probe_interval_s
        self.limit = int(self._estimate)
        self._sum = self._raw_sum = self._delay_sum = 0.0
        self._count = 0
        self._loaded = False
        self._window_end = now + self._window_s()
