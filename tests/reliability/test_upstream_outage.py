"""The upstream SIGKILLed under load: the circuit breaker opens, refuses fast, recovers.

Retries are off (``attempts: 1``) so that one client request is one upstream outcome
and the figures below are exact.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.reliability.support import (
    GatewayProcess,
    UpstreamProcess,
    gateway_config,
    gateway_process,
    metric_sum,
    percentile,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

FAILURES = 5
OPEN_S = 2.0
CLIENTS = 8
CIRCUIT_OPEN = "circuit-open"


@dataclass
class Outcomes:
    rows: list[tuple[float, int, str, float]] = field(default_factory=list)  # t, status, type, s
    errors: list[str] = field(default_factory=list)

    def between(self, lo: float, hi: float) -> list[tuple[float, int, str, float]]:
        return [r for r in self.rows if lo <= r[0] < hi]


async def _get(s: aiohttp.ClientSession, gw: GatewayProcess, out: Outcomes) -> int:
    t0 = time.monotonic()
    async with s.get(gw.url("/work")) as r:
        body = await r.read()
        kind = ""
        if r.status == 503:
            kind = CIRCUIT_OPEN if CIRCUIT_OPEN.encode() in body else "other"
            assert r.headers.get("Retry-After", "").isdigit()
        out.rows.append((t0, r.status, kind, time.monotonic() - t0))
        return r.status


def _within(metrics: dict[str, float], le: str) -> float:
    """Requests on route api answered within ``le`` seconds (a histogram bucket)."""
    return metric_sum(metrics, "gateway_request_duration_seconds_bucket", route="api", le=le)


async def test_upstream_killed_breaker_opens_refuses_fast_and_recovers(
    upstream: UpstreamProcess,
) -> None:
    cfg = gateway_config(
        upstream.url,
        upstreams={
            "api": {
                "url": upstream.url,
                "health": {"interval_s": 0.2, "critical": False},
                "retries": {"attempts": 1},
                "circuit_breaker": {
                    "consecutive_failures": FAILURES,
                    "min_requests": 100_000,  # only the consecutive rule in play
                    "open_s": OPEN_S,
                    "half_open_requests": 2,
                },
            }
        },
    )
    async with AsyncExitStack() as stack:
        gw = await stack.enter_async_context(gateway_process(cfg, name="breaker"))
        s = await stack.enter_async_context(aiohttp.ClientSession())
        out = Outcomes()
        stop = asyncio.Event()

        async def client() -> None:
            while not stop.is_set():
                try:
                    await _get(s, gw, out)
                except aiohttp.ClientError as exc:
                    out.errors.append(type(exc).__name__)
                await asyncio.sleep(0.002)

        tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
        try:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(upstream.kill)
            killed_at = time.monotonic()
            while not any(r[2] == CIRCUIT_OPEN for r in out.between(killed_at, 1e18)):
                assert time.monotonic() - killed_at < 3, "the breaker never opened"
                await asyncio.sleep(0.01)
            opened_at = min(r[0] for r in out.between(killed_at, 1e18) if r[2] == CIRCUIT_OPEN)
            await asyncio.sleep(0.1)  # requests admitted before it opened have finished
            m1 = await gw.metrics()
            w0 = time.monotonic()
            await asyncio.sleep(0.8)
            w1 = time.monotonic()
            m2 = await gw.metrics()
            assert w1 < opened_at + OPEN_S, "the measuring window ran into half-open"

            await asyncio.to_thread(upstream.start)
            restarted_at = time.monotonic()
            closed_at = None
            while time.monotonic() - restarted_at < OPEN_S + 5:
                m = await gw.metrics()
                if metric_sum(m, "gateway_circuit_state", upstream="api", state="closed") == 1:
                    closed_at = time.monotonic()
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        final = await gw.metrics()

        # every failure answered before the first refusal (there were none before the kill)
        failed_before_open = [r for r in out.between(0, opened_at) if r[1] in (502, 504)]
        window = out.between(w0, w1)
        refusal_latencies = [r[3] for r in window]
        buckets = {
            le: _within(m2, le) - _within(m1, le)
            for le in ("0.001", "0.0025", "0.005", "0.01", "0.025", "+Inf")
        }
        count_delta = buckets["+Inf"]
        after_close = out.between(closed_at or 1e18, 1e18)
        report(
            "upstream killed",
            failed_before_open=len(failed_before_open),
            opened_after_ms=round((opened_at - killed_at) * 1000, 1),
            refusals_in_window=len(window),
            refusal_client_p50_ms=round(percentile(refusal_latencies, 0.5) * 1000, 2),
            refusal_client_p99_ms=round(percentile(refusal_latencies, 0.99) * 1000, 2),
            refusals_server_by_bucket={k: int(v) for k, v in buckets.items()},
            closed_after_restart_s=None
            if closed_at is None
            else round(closed_at - restarted_at, 2),
            client_errors=out.errors[:3],
        )
        # opened after the configured failures (plus those already in flight, at most one
        # per concurrent client)
        assert FAILURES <= len(failed_before_open) <= FAILURES + CLIENTS
        assert opened_at - killed_at < 1.0
        # while open: only refusals, timed by the gateway's own histogram.  The refusal
        # path has no await; the rare one over 5 ms is the process being descheduled
        # (clients and gateway share 2 cores), so: 99 % within 5 ms, all within 25 ms
        assert len(window) > 100
        assert {(r[1], r[2]) for r in window} == {(503, CIRCUIT_OPEN)}
        assert count_delta >= len(window)
        assert buckets["0.005"] >= 0.99 * count_delta, buckets
        assert buckets["0.025"] == count_delta, buckets
        assert percentile(refusal_latencies, 0.5) < 0.005
        # recovery: half-open trials succeeded, closed, traffic flows again
        assert closed_at is not None, "the breaker did not close after the upstream returned"
        assert closed_at - restarted_at < OPEN_S + 2
        assert after_close
        assert {r[1] for r in after_close} == {200}
        for frm, to in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
            n = metric_sum(
                final,
                "gateway_circuit_transitions_total",
                upstream="api",
                from_state=frm,
                to_state=to,
            )
            assert n >= 1, f"no {frm} -> {to} transition"
        # no client ever saw a broken connection: every failure was an HTTP answer
        assert out.errors == []
        assert {r[1] for r in out.rows} <= {200, 502, 503}

        # exactly the configured number, with one client at a time
        await asyncio.to_thread(upstream.kill)
        seq = Outcomes()
        statuses = [await _get(s, gw, seq) for _ in range(FAILURES + 3)]
        report("upstream killed, one client", statuses=statuses)
        assert statuses == [502] * FAILURES + [503] * 3
        assert gw.unexpected_log_lines() == [], gw.unexpected_log_lines()[:3]
