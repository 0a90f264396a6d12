"""A spray of distinct client addresses (X-Forwarded-For from a trusted proxy).

Every request comes from a new address, so each one creates rate-limit state.  The
route has two policies: ``spray`` (per IP, refilled 2 s after a request) and ``gate``
(per route, spent by the first request): every request after the first is answered 429
without an upstream round trip, while still creating its per-IP bucket (both policies
are decided, see gateway/stores/limiter.py), so the spray runs at the limiter's speed.

Figures: the gateway's RSS (``/proc/PID/status``) must stay bounded while the
addresses keep coming (state is reclaimed once buckets refill), and a second spray after
the refill must reuse the memory (CPython keeps freed memory for reuse rather than
returning it to the system, so "back to the baseline" is measured as "no new growth").

``GATEWAY_SPRAY_N`` sets the number of addresses (CI default 200,000; 1,000,000 for the
full run).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.reliability.support import (
    GatewayProcess,
    RawUpstream,
    env_int,
    gateway_config,
    gateway_process,
    report,
)

SPRAY_N = env_int("GATEWAY_SPRAY_N", 200_000)
PERIOD_S = 2.0
SOCKETS = 8
DEPTH = 32
MB = 1024

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.slow,
    pytest.mark.timeout(60 + SPRAY_N // 2000),
]


def _address(i: int) -> bytes:
    return b"10.%d.%d.%d" % ((i >> 16) & 255, (i >> 8) & 255, i & 255)


async def _pump(port: int, first: int, count: int, statuses: dict[int, int]) -> None:
    """Send ``count`` requests from addresses ``first``.. on one connection, pipelined."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        sent = 0
        while sent < count:
            n = min(DEPTH, count - sent)
            writer.write(
                b"".join(
                    b"GET /s HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: %s\r\n\r\n"
                    % _address(first + sent + j)
                    for j in range(n)
                )
            )
            sent += n
            for _ in range(n):
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                statuses[status] = statuses.get(status, 0) + 1
                at = head.find(b"Content-Length: ")
                length = int(head[at + 16 : head.find(b"\r\n", at)]) if at >= 0 else 0
                await reader.readexactly(length)
    finally:
        writer.close()


async def _spray(gw: GatewayProcess, first: int, count: int) -> tuple[dict[int, int], float, int]:
    """Spray ``count`` addresses; return (statuses, requests per second, peak RSS in kB)."""
    statuses: dict[int, int] = {}
    peak = gw.rss_kb()
    done = asyncio.Event()

    async def sampler() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, gw.rss_kb())
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(sampler())
    share = count // SOCKETS
    t0 = time.monotonic()
    await asyncio.gather(
        *(_pump(gw.port, first + k * share, share, statuses) for k in range(SOCKETS))
    )
    rate = SOCKETS * share / (time.monotonic() - t0)
    done.set()
    await watcher
    return statuses, rate, max(peak, gw.rss_kb())


async def _violated(gw: GatewayProcess, address: bytes) -> list[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /s HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: %s\r\n\r\n" % address)
        head = await reader.readuntil(b"\r\n\r\n")
        at = head.find(b"Content-Length: ")
        body = await reader.readexactly(int(head[at + 16 : head.find(b"\r\n", at)]))
        assert head.startswith(b"HTTP/1.1 429"), head
        return list(json.loads(body)["violated_policies"])
    finally:
        writer.close()


async def test_address_spray_keeps_memory_bounded(raw_upstream: RawUpstream) -> None:
    cfg = gateway_config(
        raw_upstream.url,
        trusted_proxies=["127.0.0.1/32"],
        routes=[
            {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["spray", "gate"]}
        ],
        rate_limit={
            "policies": {
                "spray": {"requests": 1, "period_s": PERIOD_S, "burst": 1, "key": "ip"},
                "gate": {"requests": 1, "period_s": 3600, "burst": 1, "key": "route"},
            }
        },
    )
    async with gateway_process(cfg, name="spray") as gw:
        # warm up (code paths, pools, caches), then let those buckets refill
        warm, _, _ = await _spray(gw, 1 << 23, 4096)
        await asyncio.sleep(PERIOD_S + 1)
        baseline = gw.rss_kb()

        first_n = SPRAY_N * 3 // 4
        s1, rate1, peak1 = await _spray(gw, 0, first_n)
        end1 = gw.rss_kb()
        await asyncio.sleep(PERIOD_S + 2)  # every bucket refilled; reclaim runs when idle
        rested = gw.rss_kb()
        s2, rate2, peak2 = await _spray(gw, first_n, SPRAY_N - first_n)
        end2 = gw.rss_kb()

        # the limiter still limits per address after the spray
        fresh = _address((1 << 23) + 100_000)
        first_try = await _violated(gw, fresh)
        second_try = await _violated(gw, fresh)

        report(
            "address spray",
            addresses=SPRAY_N,
            rate_rps=(round(rate1), round(rate2)),
            rss_baseline_mb=round(baseline / MB, 1),
            growth_peak1_mb=round((peak1 - baseline) / MB, 1),
            growth_end1_mb=round((end1 - baseline) / MB, 1),
            growth_rested_mb=round((rested - baseline) / MB, 1),
            growth_peak2_over_rested_mb=round((peak2 - rested) / MB, 1),
            growth_end2_mb=round((end2 - baseline) / MB, 1),
            statuses=(s1, s2),
        )
        total = {k: s1.get(k, 0) + s2.get(k, 0) + warm.get(k, 0) for k in {*s1, *s2, *warm}}
        assert set(total) <= {200, 429}, total
        assert total.get(200, 0) == 1  # the one request the route gate let through
        assert sum(total.values()) >= SPRAY_N
        # bounded: live buckets are those of the last PERIOD_S seconds, whatever N is
        # (without reclaim, 150,000 addresses alone would add ~18 MB)
        assert peak1 - baseline < 12 * MB
        # reused: a second spray after the refill adds next to nothing
        assert peak2 - rested < 3 * MB
        assert end2 - baseline < 12 * MB
        assert first_try == ["gate"]
        assert second_try == ["spray", "gate"]
        assert gw.unexpected_log_lines() == []
