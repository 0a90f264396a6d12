"""``requests_by_plan`` over real sockets (SPEC 11): the plan of a verified token
(``plan_claim``) or of an API key sets ``requests`` (and ``burst`` unless given) for that
plan; other plans and none use ``requests``; on both backends, calendar quotas included."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import Gateway
from gateway.config import ConfigError, load_text
from tests.gw import base_config, running_gateway, running_replicas, url
from tests.integration.test_identity import _RSA, _jwks, _token

pytestmark = pytest.mark.timeout(60)

PRO_KEY = "key-of-a-pro-team-0123456789"
FREE_KEY = "key-of-a-free-team-012345678"


def _cfg(
    upstream: str, tmp_path: Path, policy: dict[str, Any], name: str = "per-user"
) -> dict[str, Any]:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(_jwks(_RSA))
    keys = tmp_path / "keys.yaml"
    pro = hashlib.sha256(PRO_KEY.encode()).hexdigest()
    free = hashlib.sha256(FREE_KEY.encode()).hexdigest()
    keys.write_text(
        f"keys:\n  - {{id: team-pro, sha256: {pro}, plan: pro}}\n"
        f"  - {{id: team-free, sha256: {free}}}\n"
    )
    return base_config(
        upstream,
        identity={
            "jwt": {"jwks_file": str(jwks), "plan_claim": "plan"},
            "api_keys": {"file": str(keys)},
        },
        rate_limit={"policies": {name: policy}},
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": [name]}],
        abuse={"enabled": False},
    )


async def _statuses(
    s: aiohttp.ClientSession, gw: Gateway, headers: Mapping[str, str], n: int
) -> tuple[list[int], list[str]]:
    statuses, policies = [], []
    for _ in range(n):
        async with s.get(url(gw, "/x"), headers=dict(headers)) as r:
            statuses.append(r.status)
            policies.append(r.headers.get("RateLimit-Policy", ""))
    return statuses, policies


def _bearer(sub: str, plan: str | None = None) -> dict[str, str]:
    token = _token(sub, plan=plan) if plan is not None else _token(sub)
    return {"Authorization": f"Bearer {token}"}


async def test_the_token_plan_sets_requests_and_burst(upstream: str, tmp_path: Path) -> None:
    policy = {"requests": 2, "period_s": 3600, "key": "jwt:sub", "requests_by_plan": {"pro": 5}}
    async with (
        running_gateway(_cfg(upstream, tmp_path, policy)) as gw,
        aiohttp.ClientSession() as s,
    ):
        statuses, headers = await _statuses(s, gw, _bearer("ann", "pro"), 6)
        assert statuses == [200] * 5 + [429]
        assert headers[0] == '"per-user";q=5;w=3600'
        assert headers[5] == '"per-user";q=5;w=3600'
        # another plan, and no plan: requests
        statuses, headers = await _statuses(s, gw, _bearer("bob", "free"), 3)
        assert statuses == [200, 200, 429]
        assert headers[0] == '"per-user";q=2;w=3600'
        statuses, _ = await _statuses(s, gw, _bearer("cid"), 3)
        assert statuses == [200, 200, 429]
        # a plan claim that is not a string is no plan
        statuses, _ = await _statuses(
            s, gw, {"Authorization": f"Bearer {_token('dan', plan=1)}"}, 3
        )
        assert statuses == [200, 200, 429]


async def test_a_given_burst_stays(upstream: str, tmp_path: Path) -> None:
    policy = {
        "requests": 2,
        "period_s": 3600,
        "burst": 3,
        "key": "jwt:sub",
        "requests_by_plan": {"pro": 50},
    }
    async with (
        running_gateway(_cfg(upstream, tmp_path, policy)) as gw,
        aiohttp.ClientSession() as s,
    ):
        statuses, headers = await _statuses(s, gw, _bearer("eve", "pro"), 4)
        assert statuses == [200, 200, 200, 429]
        assert headers[0] == '"per-user";q=50;w=3600'


async def test_the_api_key_plan_sets_a_calendar_quota(upstream: str, tmp_path: Path) -> None:
    policy = {"requests": 1, "period": "day", "key": "api_key", "requests_by_plan": {"pro": 3}}
    async with (
        running_gateway(_cfg(upstream, tmp_path, policy, "daily")) as gw,
        aiohttp.ClientSession() as s,
    ):
        statuses, headers = await _statuses(s, gw, {"X-API-Key": PRO_KEY}, 4)
        assert statuses == [200, 200, 200, 429]
        assert headers[0] == '"daily";q=3;w=86400'
        statuses, _ = await _statuses(s, gw, {"X-API-Key": FREE_KEY}, 2)
        assert statuses == [200, 429]


async def test_a_pro_plan_is_exact_across_two_gateways_on_redis(
    upstream: str, tmp_path: Path, redis_url: str
) -> None:
    name = f"plan-{uuid.uuid4().hex[:8]}"
    policy = {"requests": 1, "period_s": 3600, "key": "jwt:sub", "requests_by_plan": {"pro": 7}}
    cfg = _cfg(upstream, tmp_path, policy, name)
    cfg["rate_limit"]["backend"] = "redis"
    env = {"GATEWAY_REDIS_URL": redis_url}
    async with running_replicas(cfg, env) as (a, b), aiohttp.ClientSession() as s:
        tokens = [_bearer("gus", "pro") for _ in range(3)]

        async def hit(i: int) -> int:
            async with s.get(url((a, b)[i % 2], "/x"), headers=tokens[i % 3]) as r:
                return r.status

        statuses = await asyncio.gather(*(hit(i) for i in range(20)))
        assert statuses.count(200) == 7


async def test_an_address_keyed_policy_reads_the_plan(upstream: str, tmp_path: Path) -> None:
    policy = {"requests": 1, "period_s": 3600, "key": "ip", "requests_by_plan": {"pro": 3}}
    async with (
        running_gateway(_cfg(upstream, tmp_path, policy)) as gw,
        aiohttp.ClientSession() as s,
    ):
        statuses, headers = await _statuses(s, gw, _bearer("hal", "pro"), 4)
        assert statuses == [200, 200, 200, 429]
        assert headers[0] == '"per-user";q=3;w=3600'
        # the address's own budget (the plan's is apart)
        statuses, _ = await _statuses(s, gw, {}, 2)
        assert statuses == [200, 429]


def test_plans_need_a_plan_source(tmp_path: Path) -> None:
    policy = {"requests": 2, "period_s": 60, "key": "ip", "requests_by_plan": {"pro": 5}}
    cfg = _cfg("http://127.0.0.1:1", tmp_path, policy)
    del cfg["identity"]
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg), environ={})
    assert "rate_limit.policies.per-user.requests_by_plan" in {p.path for p in info.value.problems}
    cfg["rate_limit"]["policies"]["per-user"] = {"max_inflight": 2, "requests_by_plan": {"pro": 5}}
    with pytest.raises(ConfigError) as info:
        load_text(yaml.safe_dump(cfg), environ={})
    assert "rate_limit.policies.per-user.requests_by_plan" in {p.path for p in info.value.problems}


async def test_explain_shows_the_plan_the_cost_and_the_plans_budget(
    upstream: str, tmp_path: Path
) -> None:
    policy = {"requests": 2, "period_s": 3600, "key": "jwt:sub", "requests_by_plan": {"pro": 5}}
    cfg = _cfg(upstream, tmp_path, policy)
    cfg["routes"][0]["cost"] = 2
    admin = "plans-admin-token-0123456789"
    async with (
        running_gateway(cfg, {"GATEWAY_ADMIN_TOKEN": admin}) as gw,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as s,
    ):
        token = _bearer("ivy", "pro")["Authorization"]
        query = {"ip": "10.0.0.9", "path": "/x", "header": f"Authorization:{token}"}
        async with s.get(f"http://127.0.0.1:{gw.admin_port}/admin/explain", params=query) as r:
            out = await r.json()
        assert out["identity"] == "jwt:ivy"
        assert out["plan"] == "pro"
        assert out["cost"] == 2
        [pol] = out["policies"]
        assert pol["policy"] == "per-user"
        assert pol["key"] == "j:sub:ivy"
        assert pol["remaining"] == 3  # 5 of the pro plan, less this request's 2
