"""Overload protection's pure decisions: priority admission and the adaptive limit.

The adaptive limit is driven by a small discrete-event model of an upstream (a number of
workers, a service time, a FIFO queue inside it) and closed-loop clients, on a simulated
clock: no sockets, no sleeps, the same result every run.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from dataclasses import dataclass, field

import pytest

from gateway.core.concurrency import GradientLimit, Priority, admits, critical_reserve

B, N, C = Priority.BULK, Priority.NORMAL, Priority.CRITICAL


@pytest.mark.parametrize(
    ("priority", "inflight", "critical_inflight", "limit", "cap", "reserve", "admitted"),
    [
        # An idle upstream admits anything, whatever the limit.
        (B, 0, 0, 1, 1, 0, True),
        (N, 0, 0, 1, 1, 1, True),
        # bulk: under half the limit.
        (B, 4, 0, 10, 100, 1, True),
        (B, 5, 0, 10, 100, 1, False),
        (B, 4, 0, 9, 100, 0, True),  # 8 < 9
        (B, 5, 0, 9, 100, 0, False),  # 10 >= 9
        # normal: under the limit less the critical reserve ...
        (N, 8, 0, 10, 100, 1, True),
        (N, 9, 0, 10, 100, 1, False),
        # ... which is 0 on an upstream no critical route uses (version-1 behaviour).
        (N, 9, 0, 10, 100, 0, True),
        (N, 10, 0, 10, 100, 0, False),
        # critical: while critical alone does not fill the limit, under the hard cap.
        (C, 50, 9, 10, 100, 1, True),
        (C, 50, 10, 10, 100, 1, False),
        (C, 100, 0, 10, 100, 1, False),
        # The hard cap binds every priority.
        (N, 10, 0, 20, 10, 0, False),
        (C, 10, 0, 20, 10, 0, False),
    ],
)
def test_admission_table(  # noqa: PLR0917 (one parameter a column of the table)
    priority: Priority,
    inflight: int,
    critical_inflight: int,
    limit: int,
    cap: int,
    reserve: int,
    admitted: bool,
) -> None:
    got = admits(
        priority,
        inflight=inflight,
        critical_inflight=critical_inflight,
        limit=limit,
        cap=cap,
        reserve=reserve,
    )
    assert got is admitted


@pytest.mark.parametrize(
    ("limit", "reserve"), [(1, 1), (9, 1), (10, 1), (19, 1), (20, 2), (500, 50)]
)
def test_critical_reserve_is_a_tenth_at_least_one(limit: int, reserve: int) -> None:
    assert critical_reserve(limit) == reserve


def test_bulk_is_refused_before_normal_and_normal_before_critical() -> None:
    limit, cap = 20, 500
    reserve = critical_reserve(limit)
    refused_at = {
        p: next(
            n
            for n in range(1, cap + 1)
            if not admits(p, inflight=n, critical_inflight=0, limit=limit, cap=cap, reserve=reserve)
        )
        for p in Priority
    }
    assert refused_at[B] < refused_at[N] < refused_at[C]
    assert (refused_at[B], refused_at[N], refused_at[C]) == (10, 18, cap)


@pytest.mark.parametrize(("minimum", "maximum"), [(0, 10), (5, 4), (-1, 1)])
def test_limit_bounds_are_checked(minimum: int, maximum: int) -> None:
    with pytest.raises(ValueError, match="minimum"):
        GradientLimit(minimum=minimum, maximum=maximum, now=0.0)


# --------------------------------------------------------------------------- a simulated upstream


@dataclass
class Upstream:
    workers: int
    service_s: float
    jitter: float = 0.1
    busy: int = 0
    queue: list[tuple[float, int]] = field(default_factory=list)  # (admitted at, inflight)


@dataclass
class Run:
    """What a simulated run saw, from ``since`` on."""

    completions: int = 0
    latency_sum: float = 0.0
    latencies: list[float] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)
    refused: int = 0

    @property
    def mean_latency(self) -> float:
        return self.latency_sum / self.completions

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(len(ordered) * 0.99)]


def simulate(
    limiter: GradientLimit,
    upstream: Upstream,
    *,
    clients: int,
    until: float,
    since: float,
    start: float = 0.0,
    retry_s: float = 0.005,
    think_s: float = 0.0,
    seed: int = 7,
    changes: dict[float, tuple[int, float]] | None = None,
    lag_s: float = 0.0,
    lag_seen: bool = False,
    lag_swing: float = 0.0,
) -> Run:
    """Closed-loop clients (each sends again when answered, or ``retry_s`` after a refusal)
    in front of an upstream of ``workers`` x ``service_s``; the limiter admits ``normal``.
    ``lag_s`` is the gateway's own delay, added to every latency it measures (a busy
    event loop reads an answer late), swinging by ``lag_swing`` of itself up and down
    over a second and a half (a busy loop's lag is not steady); with ``lag_seen`` each
    sample also tells the limiter that delay (the event loop's lag, as the gateway
    passes it)."""
    rng = random.Random(seed)
    run = Run()
    seq = itertools.count()
    events: list[tuple[float, int, str, float, int]] = []
    inflight = 0
    pending = sorted((changes or {}).items())

    def service() -> float:
        return upstream.service_s * (1 + upstream.jitter * (rng.random() * 2 - 1))

    for _ in range(clients):
        heapq.heappush(events, (start + rng.random() * 0.01, next(seq), "send", 0.0, 0))
    while events:
        now, _, kind, admitted_at, at_admission = heapq.heappop(events)
        if now > until:
            break
        while pending and pending[0][0] <= now:
            upstream.workers, upstream.service_s = pending.pop(0)[1]
        if kind == "send":
            ok = admits(
                Priority.NORMAL,
                inflight=inflight,
                critical_inflight=0,
                limit=limiter.limit,
                cap=limiter.maximum,
                reserve=0,
            )
            if not ok:
                run.refused += now >= since
                heapq.heappush(events, (now + retry_s, next(seq), "send", 0.0, 0))
                continue
            inflight += 1
            if upstream.busy < upstream.workers:
                upstream.busy += 1
                heapq.heappush(events, (now + service(), next(seq), "done", now, inflight))
            else:
                upstream.queue.append((now, inflight))
        else:  # done
            inflight -= 1
            lag = lag_s * (1 + lag_swing * math.sin(now * 2 * math.pi / 1.5))
            latency = now - admitted_at + lag
            if lag_seen:
                limiter.on_sample(latency, now, at_admission, delay_s=lag)
            else:
                limiter.on_sample(latency, now, at_admission)
            if now >= since:
                run.completions += 1
                run.latency_sum += latency
                run.latencies.append(latency)
                run.limits.append(limiter.limit)
            if upstream.queue and upstream.busy <= upstream.workers:
                queued_at, queued_inflight = upstream.queue.pop(0)
                heapq.heappush(
                    events, (now + service(), next(seq), "done", queued_at, queued_inflight)
                )
            else:
                upstream.busy -= 1
            heapq.heappush(events, (now + think_s, next(seq), "send", 0.0, 0))
    return run


def _limiter(**kwargs: float) -> GradientLimit:
    return GradientLimit(minimum=4, maximum=500, now=0.0, probe_interval_s=kwargs.get("probe", 5.0))


def test_the_limit_settles_just_above_the_upstreams_real_concurrency() -> None:
    """8 workers x 20 ms (400 req/s), 64 greedy clients: the gateway keeps the upstream
    busy (goodput >= 90 % of its capacity) with a short queue inside it (latency near the
    no-load 20 ms instead of 64 / 8 x 20 = 160 ms)."""
    limiter = _limiter()
    run = simulate(limiter, Upstream(8, 0.020), clients=64, until=20.0, since=5.0)
    goodput = run.completions / 15.0
    assert goodput >= 0.9 * 400
    assert run.mean_latency <= 1.6 * 0.020
    median_limit = sorted(run.limits)[len(run.limits) // 2]
    assert 8 <= median_limit <= 16


def test_twice_the_capacity_gets_about_twice_the_limit() -> None:
    small = simulate(_limiter(), Upstream(8, 0.020), clients=96, until=15.0, since=5.0)
    large = simulate(_limiter(), Upstream(16, 0.020), clients=96, until=15.0, since=5.0)
    ratio = (sum(large.limits) / len(large.limits)) / (sum(small.limits) / len(small.limits))
    assert 1.6 <= ratio <= 2.4
    assert large.completions / 10.0 >= 0.9 * 800


def test_the_limit_rises_within_seconds_when_the_upstream_gets_more_capacity() -> None:
    limiter = _limiter()
    run = simulate(
        limiter,
        Upstream(8, 0.020),
        clients=96,
        until=14.0,
        since=11.0,
        changes={8.0: (16, 0.020)},
    )
    assert run.completions / 3.0 >= 0.9 * 800
    assert min(run.limits) >= 16


def test_the_limit_follows_an_upstream_that_gets_slower_for_good() -> None:
    """Service time 20 -> 60 ms at t=8: the limit falls at once (latency triples), the
    next probe measures the new no-load latency, and goodput returns near capacity."""
    limiter = _limiter()
    run = simulate(
        limiter,
        Upstream(8, 0.020),
        clients=64,
        until=24.0,
        since=16.0,
        changes={8.0: (8, 0.060)},
    )
    assert run.completions / 8.0 >= 0.9 * 8 / 0.060
    assert run.mean_latency <= 1.6 * 0.060
    assert limiter.no_load_s == pytest.approx(0.060, rel=0.15)


def test_load_that_begins_with_the_gateway_busier_does_not_sink_the_limit() -> None:
    """The no-load latency is learned while the upstream is lightly used; then a flood
    comes and the gateway's own delay (its loop busy with it) adds 12 ms to every latency
    it measures, with no queue in the upstream.  Measured against the quiet figure, that
    reads as a queue and the limit would sink to its minimum until the next periodic
    probe, 10 s on; a sample counts for at most twice the no-load latency, and a limit
    halved since the last probe measures the no-load latency again."""
    limiter = GradientLimit(minimum=4, maximum=500, now=0.0, probe_interval_s=10.0)
    simulate(limiter, Upstream(8, 0.020), clients=2, until=3.0, since=0.0)
    assert limiter.no_load_s == pytest.approx(0.020, rel=0.15)
    run = simulate(
        limiter, Upstream(8, 0.020), clients=64, start=3.0, until=9.0, since=4.0, lag_s=0.012
    )
    assert run.completions / 5.0 >= 0.9 * 400
    assert sorted(run.limits)[len(run.limits) // 10] >= 8  # 90 % of the time


def test_a_limit_halved_by_the_gateways_own_delay_measures_again_without_waiting() -> None:
    """Under load, the gateway's own delay grows (its CPU taken by other work) and adds
    30 ms to every latency it measures, with no queue in the upstream: the limit falls,
    and once it has halved since the last probe it probes again (rather than 10 s on),
    so it is back near where it was within a couple of seconds."""
    limiter = GradientLimit(minimum=4, maximum=500, now=0.0, probe_interval_s=10.0)
    simulate(limiter, Upstream(8, 0.020), clients=64, until=3.0, since=0.0)
    run = simulate(
        limiter, Upstream(8, 0.020), clients=64, start=3.0, until=9.0, since=5.0, lag_s=0.030
    )
    assert run.completions / 4.0 >= 0.9 * 400
    assert sorted(run.limits)[len(run.limits) // 10] >= 8  # 90 % of the time


@pytest.mark.parametrize("lag_s", [0.003, 0.006, 0.012])
def test_a_gateway_busy_with_its_own_cpu_does_not_shed_a_fast_upstream(lag_s: float) -> None:
    """A fast upstream (2 ms, room for everyone) learned while quiet; then 50 greedy
    clients keep the gateway's CPU busy and its loop reads every answer late, by 0 to
    twice ``lag_s`` as its lag swings, with no queue in the upstream.  Refusing would
    not make the gateway faster (a 503 costs about the CPU of a forwarded request), so
    once the limit has grown to the load it must stay above the 50 the clients ask for:
    nothing is refused.  The limiter is told the loop's lag with each sample, and a rise
    that lag explains is not a queue in the upstream (without it, most of the clients'
    requests are refused: the no-load figure is learned while the lag is low, and every
    window where it is higher reads as a queue)."""
    limiter = GradientLimit(minimum=4, maximum=500, now=0.0, probe_interval_s=10.0)
    simulate(limiter, Upstream(256, 0.002), clients=2, until=2.0, since=0.0)
    assert limiter.no_load_s == pytest.approx(0.002, rel=0.15)
    run = simulate(
        limiter,
        Upstream(256, 0.002),
        clients=50,
        start=2.0,
        until=14.0,
        since=3.0,
        lag_s=lag_s,
        lag_seen=True,
        lag_swing=1.0,
    )
    assert run.refused == 0
    assert min(run.limits) >= 50


def test_a_busy_gateway_still_lowers_the_limit_when_the_upstream_queues() -> None:
    """The gateway's own delay is taken off, not the upstream's queue: 8 workers x 20 ms
    and 64 greedy clients while the loop's lag swings between 0 and 24 ms, the limit
    still settles just above the upstream's real concurrency, and what the upstream
    itself takes (the latency less the lag) stays near its no-load 20 ms, not the 160 ms
    of 64 requests queued in it.  (A little above the 1.6 times of a quiet gateway: a
    lag higher than when the no-load latency was measured is all taken off, a lower
    one is not added back.)"""
    limiter = _limiter()
    run = simulate(
        limiter,
        Upstream(8, 0.020),
        clients=64,
        until=20.0,
        since=5.0,
        lag_s=0.012,
        lag_seen=True,
        lag_swing=1.0,
    )
    assert run.completions / 15.0 >= 0.9 * 400
    assert run.mean_latency - 0.012 <= 2.2 * 0.020
    assert 8 <= statistics.median(run.limits) <= 16


def test_a_refused_request_waits_at_most_the_no_load_latency() -> None:
    limiter = GradientLimit(minimum=4, maximum=500, now=0.0)
    assert limiter.refusal_wait_s == 0.0  # nothing measured yet: refused at once
    simulate(limiter, Upstream(8, 0.020), clients=2, until=1.0, since=0.0)
    assert limiter.refusal_wait_s == pytest.approx(limiter.no_load_s)
    assert limiter.refusal_wait_s == pytest.approx(0.020, rel=0.15)
    slow = GradientLimit(minimum=4, maximum=500, now=0.0)
    simulate(slow, Upstream(8, 2.0), clients=2, until=30.0, since=0.0)
    assert slow.no_load_s > 1.0
    assert slow.refusal_wait_s == GradientLimit.MAX_REFUSAL_WAIT_S


def test_the_limit_never_passes_its_bounds() -> None:
    tight = GradientLimit(minimum=6, maximum=10, now=0.0)
    run = simulate(tight, Upstream(50, 0.010), clients=40, until=5.0, since=0.0)
    assert max(run.limits) <= 10
    assert run.limits[-1] == 10  # a fast upstream: the limit climbs to the cap
    floor = GradientLimit(minimum=6, maximum=100, now=0.0)
    run = simulate(floor, Upstream(2, 0.050), clients=40, until=10.0, since=0.0)
    assert min(run.limits) >= 3  # half of the minimum during a probe, never less
    assert min(lim for lim in run.limits[-50:]) >= 6 or floor.probing


def test_a_lightly_loaded_upstream_is_never_probed_and_its_limit_does_not_creep() -> None:
    """Two clients never ask for half the limit: the limit stays where it started, and no
    probe ever lowers it."""
    limiter = _limiter(probe=1.0)
    run = simulate(limiter, Upstream(8, 0.020), clients=2, until=10.0, since=0.0)
    assert set(run.limits) == {GradientLimit.INITIAL}
    assert run.refused == 0
    assert limiter.no_load_s == pytest.approx(0.020, rel=0.15)


def test_a_probe_gives_up_when_its_samples_do_not_come() -> None:
    limiter = GradientLimit(minimum=4, maximum=100, now=0.0, probe_interval_s=0.1)
    t = 0.0
    # A loaded window (each request admitted with the limit in flight), past the probe's
    # due time: the probe starts and halves the limit.
    while not limiter.probing:
        t += 0.01
        limiter.on_sample(0.05, t, limiter.limit)
    halved = limiter.limit
    # Only requests admitted before the probe come back: none counts.
    t += GradientLimit.PROBE_TIMEOUT_S
    limiter.on_sample(5.0, t, 100)
    assert not limiter.probing
    assert limiter.limit > halved
    assert math.isfinite(limiter.no_load_s)


# --------------------------------------------------------------------------- SPEC 10's scenario


@dataclass
class Scenario:
    bulk_done: int = 0
    critical: list[float] = field(default_factory=list)  # latencies, refused ones as inf
    limits: list[int] = field(default_factory=list)

    def critical_p99(self) -> float:
        ordered = sorted(self.critical)
        return ordered[int(len(ordered) * 0.99)]


def flood_and_critical(
    limiter: GradientLimit,
    workers: int,
    service_s: float,
    *,
    flood: int,
    until: float,
    since: float,
    critical_rate: float = 20.0,
    seed: int = 3,
) -> Scenario:
    """bench/overload.py's scenario on a simulated clock: ``flood`` closed-loop clients on
    a bulk route (each sends again when answered; a refused one after the wait the
    gateway makes, :attr:`GradientLimit.refusal_wait_s`), a critical caller sending
    ``critical_rate`` a second whatever the answers take, and one FIFO upstream of
    ``workers`` x ``service_s`` behind the same limit (a critical route uses it, so
    normal would leave a reserve; nothing is normal here)."""
    rng = random.Random(seed)
    seq = itertools.count()
    events: list[tuple[float, int, str, float, int, Priority]] = []
    out = Scenario()
    inflight = critical_inflight = busy = 0
    queue: list[tuple[float, int, Priority]] = []
    for _ in range(flood):
        heapq.heappush(events, (rng.random() * 0.01, next(seq), "send", 0.0, 0, B))
    t = 0.0
    while t < until:
        heapq.heappush(events, (t, next(seq), "send", 0.0, 0, C))
        t += 1 / critical_rate

    def start(now: float, admitted: float, at: int, p: Priority) -> None:
        done = now + service_s * (1 + 0.1 * (rng.random() * 2 - 1))
        heapq.heappush(events, (done, next(seq), "done", admitted, at, p))

    while events:
        now, _, kind, admitted, at, p = heapq.heappop(events)
        if now > until:
            break
        if kind == "send":
            ok = admits(
                p,
                inflight=inflight,
                critical_inflight=critical_inflight,
                limit=limiter.limit,
                cap=limiter.maximum,
                reserve=critical_reserve(limiter.limit),
            )
            if not ok:
                if p is C:
                    if now >= since:
                        out.critical.append(math.inf)
                else:
                    wait = max(limiter.refusal_wait_s, 0.001)
                    heapq.heappush(events, (now + wait, next(seq), "send", 0.0, 0, p))
                continue
            inflight += 1
            critical_inflight += p is C
            if busy < workers:
                busy += 1
                start(now, now, inflight, p)
            else:
                queue.append((now, inflight, p))
            continue
        inflight -= 1
        critical_inflight -= p is C
        limiter.on_sample(now - admitted, now, at)
        if now >= since:
            if p is C:
                out.critical.append(now - admitted)
            else:
                out.bulk_done += 1
            out.limits.append(limiter.limit)
        if queue:
            start(now, *queue.pop(0))
        else:
            busy -= 1
        if p is B:
            heapq.heappush(events, (now, next(seq), "send", 0.0, 0, p))
    return out


def test_a_bulk_flood_leaves_the_critical_route_its_latency_and_the_upstream_busy() -> None:
    """SPEC 10's goals for adaptive + priorities, with no gateway delay: 256 closed-loop
    clients on a bulk route, 20 critical requests a second, 8 workers x 20 ms: the
    critical requests all pass within twice the service time at p99, the upstream works
    at 90 % of its capacity or more; with 16 workers the limit is about twice as high."""
    small = flood_and_critical(
        GradientLimit(minimum=4, maximum=500, now=0.0), 8, 0.020, flood=256, until=12, since=4
    )
    assert math.inf not in small.critical
    assert small.critical_p99() <= 2 * 0.020
    assert small.bulk_done / 8.0 >= 0.9 * 400
    large = flood_and_critical(
        GradientLimit(minimum=4, maximum=500, now=0.0), 16, 0.020, flood=256, until=12, since=4
    )
    assert large.bulk_done / 8.0 >= 0.9 * 800
    ratio = statistics.median(large.limits) / statistics.median(small.limits)
    assert 1.5 <= ratio <= 2.5


def test_a_delay_larger_than_the_latencies_teaches_nothing() -> None:
    """The loop's lag is measured apart from the answers: one taken over a stall may be
    passed with answers the stall did not hold up.  A window whose latencies less that
    delay come to nothing leaves the no-load latency and the limit as they were."""
    limiter = GradientLimit(minimum=4, maximum=100, now=0.0)
    t = 0.0
    for _ in range(2 * GradientLimit.MIN_SAMPLES):
        t += 0.01
        limiter.on_sample(0.02, t, 1)
    no_load, limit = limiter.no_load_s, limiter.limit
    assert no_load == pytest.approx(0.02)
    for _ in range(4 * GradientLimit.MIN_SAMPLES):
        t += 0.01
        limiter.on_sample(0.02, t, 1, delay_s=0.5)
    assert (limiter.no_load_s, limiter.limit) == (no_load, limit)
