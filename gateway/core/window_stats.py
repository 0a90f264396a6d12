"""In-process traffic figures for the operator's page (SPEC section 12), with time passed in.

:class:`RouteSeries` keeps, per second for the last :data:`HISTORY_S` seconds, one route's
request count, its 5xx count and a latency histogram; :class:`TopKeys` keeps the most
rate-limited keys of the last minute. Both are bounded whatever the traffic, and cost the
request path a few integer operations: the figures are summed when someone reads them
(every 2 s, from ``/admin/stats``), never per request.

The latency histogram has fixed, log-spaced bins (:data:`BOUNDS_S`, about 12 % apart from
50 µs to 60 s), so a percentile read from it is within one bin's width of the truth,
and a percentile over a minute is the sum of 60 seconds' bins.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Final

from gateway.core.buckets import COMPILED, bucket

__all__ = ["BOUNDS_S", "HISTORY_S", "RouteSeries", "Summary", "TopKeys"]

HISTORY_S: Final = 300
"""Seconds of history a series keeps (the page's chart shows 5 minutes)."""

_FIRST_S, _LAST_S, _STEP = 50e-6, 60.0, 1.12
BOUNDS_S: Final[tuple[float, ...]] = tuple(
    _FIRST_S * _STEP**n for n in range(int(math.log(_LAST_S / _FIRST_S, _STEP)) + 2)
)
"""Upper bounds of the latency bins; one more bin holds everything above the last."""
_BINS: Final = len(BOUNDS_S) + 1


@dataclass(frozen=True, slots=True)
class Summary:
    """One route over a span of seconds."""

    requests: int
    errors: int
    p50_s: float | None
    p99_s: float | None

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class RouteSeries:
    """One route's per-second counts and latency bins, for the last :data:`HISTORY_S` s."""

    __slots__ = ("_bins", "_counts", "_errors", "_seconds")

    def __init__(self) -> None:
        self._seconds = [-1] * HISTORY_S  # which second each slot holds
        self._counts = [0] * HISTORY_S
        self._errors = [0] * HISTORY_S
        self._bins: list[list[int] | None] = [None] * HISTORY_S

    def record(self, now: float, status: int, latency_s: float) -> None:
        second = int(now)
        slot = second % HISTORY_S
        bins = self._bins[slot]
        if self._seconds[slot] != second or bins is None:
            self._seconds[slot] = second
            self._counts[slot] = 0
            self._errors[slot] = 0
            bins = self._bins[slot] = [0] * _BINS
        # (compiled: int additions, not generic +=; a Final tuple, not a global's lookup)
        counts = self._counts
        counts[slot] = counts[slot] + 1
        if status >= 500:
            errors = self._errors
            errors[slot] = errors[slot] + 1
        n = bucket(BOUNDS_S, latency_s) if COMPILED else bisect_left(BOUNDS_S, latency_s)
        bins[n] = bins[n] + 1

    def summary(self, now: float, span_s: int = 60) -> Summary:
        """The last ``span_s`` whole seconds before ``now`` (the current one included)."""
        return self._sum(int(now) - span_s + 1, int(now))

    def history(self, now: float, step_s: int = 10) -> list[tuple[int, Summary]]:
        """``(start second, summary)`` of each ``step_s`` slice of the kept history, oldest
        first, the last slice ending with the current second."""
        last = int(now)
        first = last - HISTORY_S + 1
        return [
            (start, self._sum(start, start + step_s - 1))
            for start in range(first + (HISTORY_S % step_s), last + 1, step_s)
        ]

    def _sum(self, first: int, last: int) -> Summary:
        requests = errors = 0
        total = [0] * _BINS
        for second in range(max(first, last - HISTORY_S + 1), last + 1):
            slot = second % HISTORY_S
            bins = self._bins[slot]
            if self._seconds[slot] != second or bins is None:
                continue
            requests += self._counts[slot]
            errors += self._errors[slot]
            for n, v in enumerate(bins):
                if v:
                    total[n] += v
        return Summary(
            requests, errors, _quantile(total, requests, 0.5), _quantile(total, requests, 0.99)
        )


def _quantile(bins: list[int], count: int, q: float) -> float | None:
    """The upper bound of the bin that holds the q-quantile (the last bound for the
    overflow bin), or ``None`` with no samples."""
    if not count:
        return None
    rank = max(1, math.ceil(q * count))
    seen = 0
    for n, v in enumerate(bins):
        seen += v
        if seen >= rank:
            return BOUNDS_S[min(n, len(BOUNDS_S) - 1)]
    return BOUNDS_S[-1]


class TopKeys:
    """The keys refused most over the last ``window_s`` seconds, in bounded memory.

    Counts live in ``slices`` time slices (a key's count is the sum over the slices still
    in the window). Each slice keeps at most ``capacity`` keys by the Space-Saving rule:
    a new key takes the place of the least-counted one and inherits its count (so a
    count can be over by at most that minimum, never under, and every key counted more
    than ``total / capacity`` times in a slice is kept).
    """

    __slots__ = ("_capacity", "_slice_s", "_slices")

    def __init__(self, *, window_s: float = 60.0, slices: int = 6, capacity: int = 200) -> None:
        self._capacity = capacity
        self._slice_s = window_s / slices
        self._slices: list[tuple[int, dict[str, int]]] = [(-1, {}) for _ in range(slices)]

    def add(self, key: str, now: float) -> None:
        index = int(now // self._slice_s)
        slot = index % len(self._slices)
        held, counts = self._slices[slot]
        if held != index:
            counts = {}
            self._slices[slot] = (index, counts)
        if key in counts:
            counts[key] += 1
        elif len(counts) < self._capacity:
            counts[key] = 1
        else:
            smallest = min(counts, key=counts.__getitem__)
            counts[key] = counts.pop(smallest) + 1

    def top(self, now: float, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` keys with the highest counts, highest first (ties by key)."""
        current = int(now // self._slice_s)
        oldest = current - len(self._slices) + 1
        totals: dict[str, int] = {}
        for index, counts in self._slices:
            if oldest <= index <= current:
                for key, count in counts.items():
                    totals[key] = totals.get(key, 0) + count
        return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
