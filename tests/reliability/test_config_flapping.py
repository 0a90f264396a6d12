"""Config flapping under load: valid, invalid, valid ... every 100 ms for a few seconds.

Each valid version stamps its responses with ``X-Config-Version`` (a security header the
gateway adds) and changes a policy, a breaker and the upstream pool (which is rebuilt,
the old one retired under traffic); each invalid one is broken in a different way and
carries a ``bad-`` version that must never be seen.  Reloads come from the file watcher,
SIGHUP and ``POST /admin/reload`` at once.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config import ConfigError, load_file
from tests.reliability.support import (
    RawUpstream,
    Tally,
    gateway_config,
    gateway_process,
    metric_sum,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(90)]

FLAP_S = 3.0
PERIOD_S = 0.1
VERSION = "X-Config-Version"


def _valid(base: dict[str, Any], n: int) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    cfg["security_headers"] = {"set": {VERSION: f"v{n}", "X-Frame-Options": "DENY"}}
    cfg["rate_limit"] = {
        "policies": {"per-ip": {"requests": 100_000 + n, "period_s": 1, "key": "ip"}}
    }
    up = cfg["upstreams"]["api"]
    up["max_connections"] = 50 + n % 7  # a pool setting: the pool is rebuilt, the old retired
    up["timeout_s"] = 1  # retired pools close 1 s + 1 s later, under traffic
    up["circuit_breaker"] = {"consecutive_failures": 5 + n % 3}
    cfg["routes"][0]["rate_limits"] = ["per-ip"]
    return cfg


def _invalid_texts(base: dict[str, Any], n: int) -> list[bytes]:
    """Broken configs, each in another way; all would stamp ``bad-N`` if ever applied."""
    good = _valid(base, n)
    good["security_headers"]["set"][VERSION] = f"bad-{n}"
    unknown = copy.deepcopy(good)
    unknown["rate_limit"]["polices"] = {}
    dangling = copy.deepcopy(good)
    dangling["routes"][0]["upstream"] = "nope"
    cidr = copy.deepcopy(good)
    cidr["trusted_proxies"] = ["10.0.0.1/8"]
    negative = copy.deepcopy(good)
    negative["upstreams"]["api"]["timeout_s"] = -1
    text = yaml.safe_dump(good)
    return [
        yaml.safe_dump(unknown).encode(),
        yaml.safe_dump(dangling).encode(),
        yaml.safe_dump(cidr).encode(),
        yaml.safe_dump(negative).encode(),
        text.replace(":", "", 3).encode(),  # not YAML any more
        b"- a\n- list\n",  # YAML, but not a mapping
        text.encode() + b"\xff\xfe",  # not UTF-8 text
        text.encode().replace(b"\n", b"\n\x00", 1),  # a NUL: YAML refuses it
    ]


async def test_config_flapping_under_load(raw_upstream: RawUpstream) -> None:
    base = gateway_config(raw_upstream.url, reload={"interval_s": 0.05})
    first = _valid(base, 0)
    async with (
        gateway_process(first, name="flap") as gw,
        aiohttp.ClientSession() as s,
    ):
        tally = Tally()
        seen: dict[int, list[int]] = {}
        bad_seen: list[str] = []
        stop = asyncio.Event()

        async def client(i: int) -> None:
            versions = seen.setdefault(i, [])
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.get(gw.url(f"/c{i}")) as r:
                        await r.read()
                        tally.add(r.status, time.monotonic() - t0)
                        v = r.headers.get(VERSION, "")
                        if v.startswith("v"):
                            versions.append(int(v[1:]))
                        else:
                            bad_seen.append(v)
                except aiohttp.ClientError as exc:
                    tally.error(type(exc).__name__)

        async def admin_reloads() -> None:
            headers = {"Authorization": "Bearer t"}
            while not stop.is_set():
                async with s.post(gw.admin_url("/admin/reload"), headers=headers) as r:
                    await r.read()
                    assert r.status in (200, 422), r.status
                gw.signal(signal.SIGHUP)
                await asyncio.sleep(0.25)

        before = await gw.metrics()
        tasks = [asyncio.create_task(client(i)) for i in range(10)]
        await asyncio.sleep(0.5)
        fds_before = gw.fd_count()  # the clients' connections and the pool's are open
        tasks.append(asyncio.create_task(admin_reloads()))
        writes = {"valid": 0, "invalid": 0}
        last_valid = 0
        try:
            counter = itertools.count(1)
            deadline = time.monotonic() + FLAP_S
            while time.monotonic() < deadline:
                n = next(counter)
                if n % 2:
                    last_valid = n
                    gw.write_config(_valid(base, n))
                    writes["valid"] += 1
                else:
                    texts = _invalid_texts(base, n)
                    tmp = gw.config_path.with_suffix(".tmp")
                    tmp.write_bytes(texts[(n // 2) % len(texts)])
                    tmp.replace(gw.config_path)
                    writes["invalid"] += 1
                await asyncio.sleep(PERIOD_S)
            last_valid += 2
            gw.write_config(_valid(base, last_valid))
            settled = False
            for _ in range(100):
                await asyncio.sleep(0.05)
                async with s.get(gw.url("/final")) as r:
                    if r.headers.get(VERSION) == f"v{last_valid}":
                        settled = True
                        break
            await asyncio.sleep(0.3)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        after = await gw.metrics()

        def reloads(result: str) -> float:
            return metric_sum(after, "gateway_config_reloads_total", result=result) - metric_sum(
                before, "gateway_config_reloads_total", result=result
            )

        regressions = sum(1 for v in seen.values() for a, b in itertools.pairwise(v) if b < a)
        versions_seen = sorted({x for v in seen.values() for x in v})
        report(
            "config flapping",
            writes=writes,
            reloads_success=reloads("success"),
            reloads_failure=reloads("failure"),
            responses=tally.statuses,
            client_errors=tally.errors,
            distinct_versions_served=len(versions_seen),
            version_regressions=regressions,
            max_latency_ms=round(max(tally.latencies) * 1000, 1),
        )
        assert tally.errors == {}
        assert set(tally.statuses) == {200}, tally.statuses
        assert tally.total > 500
        assert bad_seen == [], f"an invalid config served requests: {set(bad_seen)}"
        assert settled, "the last valid config was not applied"
        assert len(versions_seen) >= writes["valid"] // 3
        assert regressions == 0, "a client saw an older config after a newer one"
        assert reloads("failure") >= writes["invalid"] // 2
        assert reloads("success") >= writes["valid"] // 2
        assert gw.proc is not None
        assert gw.proc.poll() is None
        bad = gw.unexpected_log_lines(allowed=("config_reload_failed",))
        assert bad == [], bad[:3]
        # the retired pools were closed, not leaked: the fd count settles back
        await asyncio.sleep(2.5)
        fds_after = gw.fd_count()
        report("config flapping fds", before=fds_before, after=fds_after)
        assert fds_after <= fds_before + 5


def test_invalid_texts_are_all_refused(tmp_path: Path) -> None:
    """The broken variants really are broken (else the test above would prove nothing)."""
    base = gateway_config("http://127.0.0.1:1")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_valid(base, 1)))
    load_file(path, environ={})
    for data in _invalid_texts(base, 2):
        path.write_bytes(data)
        with pytest.raises(ConfigError):
            load_file(path, environ={})
