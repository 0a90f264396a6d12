"""Calendar quotas (SPEC 11, ``period: hour | day | month``) on both backends and over
real sockets: UTC windows, ``t=`` the time until the reset and ``w=`` the window, the
reset at a UTC boundary (memory: an injected wall clock; Redis: the script run with its
clock set), exact across two gateways on one Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from gateway.config import ConfigError, load_text
from gateway.core.calendar import PERIOD_CODES, month_length_s, window_at
from gateway.core.gcra import Decision
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.redis.gcra_calls import REPLY_WIDTH, decision_of
from gateway.stores.redis.scripts import load_script
from tests.gw import base_config, running_gateway, running_replicas, url
from tests.integration.test_limiter_backends import delete_prefix, unique_prefix

pytestmark = pytest.mark.timeout(90)


def ts(*when: int) -> float:
    """UTC epoch seconds of (year, month, day[, hour[, minute[, second]]])."""
    year, month, day, hour, minute, sec = (*when, 0, 0, 0)[:6]
    return dt.datetime(year, month, day, hour, minute, sec, tzinfo=dt.UTC).timestamp()


# ---------------------------------------------------------------- the script, clock set


async def _run_at(redis: Redis, at: float, keys: list[str], args: list[Any]) -> list[Decision]:
    """The GCRA script with Redis's TIME replaced by ``at`` (the only change): one
    decision a key."""
    source = load_script("gcra.lua")
    sec, usec = int(at), round((at - int(at)) * 1e6)
    clocked = source.replace("redis.call('TIME')", f"{{'{sec}', '{usec}'}}")
    assert clocked != source
    out = list(await redis.eval(clocked, len(keys), *keys, *args))
    assert len(out) == REPLY_WIDTH * len(keys)
    return [decision_of(out[i], out[i + 1]) for i in range(0, len(out), REPLY_WIDTH)]


@pytest.mark.parametrize(
    ("period", "last_second"),
    [
        ("hour", ts(2026, 12, 7, 10, 59, 59)),
        ("day", ts(2026, 12, 31, 23, 59, 59)),
        ("month", ts(2026, 12, 31, 23, 59, 59)),
        ("month", ts(2028, 2, 29, 23, 59, 59)),
        ("month", ts(2100, 2, 28, 23, 59, 59)),
    ],
)
async def test_the_script_resets_a_quota_at_the_utc_boundary(
    redis_url: str, period: str, last_second: float
) -> None:
    redis = Redis.from_url(redis_url)
    key = unique_prefix() + "q"
    rate = ["1", "3", str(PERIOD_CODES[period])]  # a quota of 3
    try:
        at = last_second + 0.25
        first = [(await _run_at(redis, at, [key], ["1", "1", "", *rate]))[0] for _ in range(4)]
        assert [d.allowed for d in first] == [True, True, True, False]
        assert [d.remaining for d in first] == [2, 1, 0, 0]
        assert first[3].retry_after_s == first[3].reset_s == 0.75  # until the boundary
        # expires with its window
        assert 0 < await redis.pttl(key) <= 750
        # a cost that does not fit is refused and takes nothing
        out = await _run_at(redis, last_second + 0.5, [key], ["1", "1", "2", *rate])
        assert not out[0].allowed
        # the next window: a fresh quota; t= the whole window
        nxt = last_second + 1
        w = window_at(period, nxt)
        out = await _run_at(redis, nxt, [key, key], ["1", "1 1", "2 2", *rate])
        assert out[0] == Decision(True, 1, 0.0, int((w.end - w.start) * 1e6) / 1e6)  # noqa: FBT003
        assert not out[1].allowed  # 2 + 2 > 3
        # peek
        out = await _run_at(redis, nxt + 1, [key], ["0", "1", "", *rate])
        assert (out[0].allowed, out[0].remaining) == (True, 0)
    finally:
        await redis.delete(key)
        await redis.aclose()


async def test_the_script_month_windows_agree_with_python(redis_url: str) -> None:
    """Each month start from 1970 to 2400 (leap years and centuries included): the
    script's window end is Python's."""
    redis = Redis.from_url(redis_url)
    prefix = unique_prefix()
    try:
        year, month = 1970, 1
        instants = []
        while year < 2400:
            instants.append(ts(year, month, 1) + 3600)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        for i, at in enumerate(instants[::7]):
            out = await _run_at(redis, at, [f"{prefix}{i}"], ["0", "1", "", "1", "5", "3"])
            w = window_at("month", at)
            want = int((w.end - at) * 1e6) / 1e6
            assert out[0].reset_s == want, dt.datetime.fromtimestamp(at, dt.UTC)
    finally:
        await delete_prefix(redis_url, prefix)
        await redis.aclose()


# ---------------------------------------------------------------- over sockets


def _cfg(upstream: str, policy: str, period: str, **extra: Any) -> dict[str, Any]:
    return base_config(
        upstream,
        rate_limit={"policies": {policy: {"requests": 2, "period": period}}, **extra},
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": [policy]}],
        abuse={"enabled": False},
    )


class Wall:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(
    ("period", "last_second", "w"),
    [
        ("day", ts(2026, 12, 31, 23, 59, 50), 86400),
        ("month", ts(2028, 2, 29, 23, 59, 50), 29 * 86400),
        ("hour", ts(2026, 12, 7, 10, 59, 50), 3600),
    ],
)
async def test_a_quota_over_sockets_resets_at_the_boundary(
    upstream: str, period: str, last_second: float, w: int
) -> None:
    wall = Wall(last_second)
    async with running_gateway(_cfg(upstream, "quota", period)) as gw, aiohttp.ClientSession() as s:
        limiter = gw.runtime.limiter
        assert isinstance(limiter, MemoryLimiter)
        limiter.wall_clock = wall  # the injected clock: ten seconds before the boundary
        seen = []
        for _ in range(3):
            async with s.get(url(gw, "/x")) as r:
                seen.append((r.status, dict(r.headers)))
        assert [st for st, _ in seen] == [200, 200, 429]
        assert seen[0][1]["RateLimit-Policy"] == f'"quota";q=2;w={w}'
        assert seen[0][1]["RateLimit"] == '"quota";r=1;t=10'
        assert seen[1][1]["RateLimit"] == '"quota";r=0;t=10'
        refused = seen[2][1]
        assert refused["Retry-After"] == "10"
        assert refused["RateLimit"] == '"quota";r=0;t=10'
        assert refused["RateLimit-Policy"] == f'"quota";q=2;w={w}'
        wall.t = last_second + 10  # the boundary
        async with s.get(url(gw, "/x")) as r:
            assert r.status == 200
            nxt = window_at(period, wall.t)
            assert r.headers["RateLimit"] == f'"quota";r=1;t={int(nxt.end - nxt.start)}'
            if period == "month":  # March: w= is the new month's length
                assert r.headers["RateLimit-Policy"] == f'"quota";q=2;w={31 * 86400}'


async def test_two_gateways_on_redis_share_a_daily_quota(upstream: str, redis_url: str) -> None:
    policy = f"daily-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(upstream, policy, "day", backend="redis")
    cfg["rate_limit"]["policies"][policy]["requests"] = 5
    env = {"GATEWAY_REDIS_URL": redis_url}
    async with running_replicas(cfg, env) as (a, b), aiohttp.ClientSession() as s:

        async def hit(i: int) -> tuple[int, dict[str, str]]:
            async with s.get(url((a, b)[i % 2], "/x")) as r:
                return r.status, dict(r.headers)

        results = await asyncio.gather(*(hit(i) for i in range(16)))
        statuses = [st for st, _ in results]
        assert statuses.count(200) == 5
        now = time.time()
        until_midnight = window_at("day", now).end - now
        for status, headers in results:
            assert headers["RateLimit-Policy"] == f'"{policy}";q=5;w=86400'
            t = int(headers["RateLimit"].rsplit("t=", 1)[1])
            assert abs(t - math.ceil(until_midnight)) <= 2
            if status == 429:
                assert abs(int(headers["Retry-After"]) - math.ceil(until_midnight)) <= 2


def test_month_w_is_the_current_month() -> None:
    assert month_length_s(time.time()) in (28 * 86400, 29 * 86400, 30 * 86400, 31 * 86400)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"requests": 5, "period": "day", "period_s": 60}, "rate_limit.policies.q.period"),
        ({"requests": 5, "period": "day", "burst": 10}, "rate_limit.policies.q.burst"),
        ({"requests": 5, "period": "week"}, "rate_limit.policies.q.period"),
        ({"max_inflight": 5, "period": "day"}, "rate_limit.policies.q.max_inflight"),
    ],
)
def test_check_config_names_the_period_field(policy: dict[str, Any], field: str) -> None:
    cfg = _cfg("http://127.0.0.1:1", "q", "day")
    cfg["rate_limit"]["policies"]["q"] = policy
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg), environ={})
    assert field in {p.path for p in info.value.problems}, info.value.problems


def test_check_config_explains_each_new_mistake_in_one_run(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": [')
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            identity:
              jwt: {{jwks_file: {jwks}}}
            rate_limit:
              policies:
                per-user: {{requests: 60, period_s: 60, key: "jwt:sub", fallback: nope}}
                per-chat: {{requests: 20, period_s: 60, key: "json:/chat/id", fallback: per-user}}
                per-tenant: {{requests: 10000, period: day, period_s: 86400, key: "jwt:tenant"}}
                weird: {{requests: 1, period_s: 1, key: "cookie:x"}}
                bad-pointer: {{requests: 1, period_s: 1, key: "json:a/b"}}
                plans: {{requests: 1, period_s: 1, key: ip, requests_by_plan: {{pro: 5}}}}
            routes:
              - {{name: r, upstream: api, rate_limits: [per-user, per-chat], cost: 0}}
            """
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode != 0
    out = r.stdout + r.stderr
    for path in (
        "routes[0].cost:",
        "rate_limit.policies.per-tenant.period: give period",
        "rate_limit.policies.weird.key: must be ip,",
        "rate_limit.policies.bad-pointer.key: JSON pointer",
        "rate_limit.policies.per-user.fallback: unknown policy 'nope'",
        "rate_limit.policies.per-chat.fallback: 'per-user' is keyed by identity",
        "rate_limit.policies.plans.requests_by_plan:",
        "identity.jwt.jwks_file:",
    ):
        assert path in out, out
