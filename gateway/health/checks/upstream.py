"""``upstream:NAME``: ``GET url + health.path``; 2xx and 3xx are successes.

Redirects are not followed; ``healthy_threshold`` / ``unhealthy_threshold`` results in
a row decide, the first result decides at once.  Critical per ``health.critical``.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from gateway.config import Upstream
from gateway.core.health import ComponentHealth, Status, ThresholdTracker
from gateway.health.checks.bounded import Bounded, Report, describe

__all__ = ["check_upstream"]

_MAX_HEALTH_BODY = 65_536  # read at most this much of a health response (keep-alive reuse)


async def _http_status(session: aiohttp.ClientSession | None, url: str, timeout_s: float) -> int:
    if session is None:
        raise RuntimeError("monitor is closed")
    async with session.get(
        url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as resp:
        await resp.content.read(_MAX_HEALTH_BODY)
        return resp.status


async def check_upstream(
    session: aiohttp.ClientSession | None,
    bounded: Bounded,
    report: Report,
    *,
    name: str,
    up: Upstream,
    tracker: ThresholdTracker,
) -> None:
    """One round of the check of upstream ``name``."""
    hc = up.health
    url = up.url + hc.path
    t0 = time.perf_counter()
    code: int | None = None
    try:
        code = await bounded(_http_status(session, url, hc.timeout_s), hc.timeout_s)
    except TimeoutError:
        error = f"timeout after {hc.timeout_s:g}s"
    except (aiohttp.ClientError, OSError) as exc:
        error = describe(exc)
    else:
        error = f"HTTP {code}"
    elapsed = time.perf_counter() - t0
    success = code is not None and 200 <= code < 400
    status = tracker.observe(success)
    if success and status is Status.UNHEALTHY:
        message = f"{error} ({tracker.successes}/{hc.healthy_threshold} to turn healthy)"
    elif not success and status is not Status.UNHEALTHY:
        message = f"{error} ({tracker.failures}/{hc.unhealthy_threshold} to turn unhealthy)"
    else:
        message = error
    details: dict[str, Any] = {"url": url, "http_status": code}
    report(
        ComponentHealth(
            f"upstream:{name}",
            status,
            hc.critical,
            elapsed * 1000 if code is not None else None,
            message,
            time.time(),
            details,
        ),
        elapsed,
    )
