"""The adaptive limit against a client that keeps a few slow requests in flight.

An upstream whose endpoints differ (a search of 10 ms, an export of 5 s) is not
overloaded by a handful of exports; a limit learned from the *mean* latency read them as
a queue, fell to ``min``, and shed everyone else's requests: one client holding 16
exports shed most of 200 requests/s.
"""

from __future__ import annotations

import heapq
import random

from gateway.core.concurrency import GradientLimit, Priority, admits, critical_reserve


def _run(slow_inflight: int, *, slow_s: float = 5.0, rps: float = 200.0) -> tuple[float, int]:
    """(share of the fast requests shed, the lowest limit seen) over 60 simulated s: an
    open stream of fast (10 ms) requests and a client that keeps ``slow_inflight`` slow
    ones in flight (trying again every 10 ms), against an upstream with room for all."""
    rng = random.Random(3)
    limit = GradientLimit(minimum=4, maximum=500, now=0.0)
    events: list[tuple[float, int, int]] = []  # (time, kind: 0 fast, 1 slow try, 2 done)
    t = 0.0
    while t < 60:
        t += rng.expovariate(rps)
        heapq.heappush(events, (t, 0, 0))
    for i in range(6000):
        heapq.heappush(events, (i * 0.01, 1, 0))
    done: dict[int, tuple[float, int, bool]] = {}
    inflight = slow = shed = fast = 0
    lowest = limit.limit
    n = 0
    while events:
        now, kind, ref = heapq.heappop(events)
        if kind == 2:
            latency, admitted_with, was_slow = done.pop(ref)
            inflight -= 1
            slow -= was_slow
            limit.on_sample(latency, now, admitted_with)
            lowest = min(lowest, limit.limit)
            continue
        if kind == 1 and slow >= slow_inflight:
            continue
        ok = admits(
            Priority.NORMAL,
            inflight=inflight,
            critical_inflight=0,
            limit=limit.limit,
            cap=limit.maximum,
            reserve=critical_reserve(limit.limit),
        )
        fast += kind == 0
        if not ok:
            shed += kind == 0
            continue
        inflight += 1
        slow += kind == 1
        latency = slow_s if kind == 1 else 0.010
        n += 1
        done[n] = (latency, inflight, kind == 1)
        heapq.heappush(events, (now + latency, 2, n))
    return shed / fast, lowest


def test_a_few_slow_requests_do_not_shed_the_fast_ones() -> None:
    for held in (8, 16):
        shed, lowest = _run(held)
        assert shed < 0.01, (held, shed)
        assert lowest > held, (held, lowest)


def test_without_slow_requests_nothing_is_shed() -> None:
    shed, _ = _run(0)
    assert shed == 0
