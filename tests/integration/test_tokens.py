"""Bearer tokens over real sockets (SPEC 11): each invalid-token case, ES256 and EdDSA keys
from the JWKS file, a key rotation, the per-address budget of failed verifications, the
verification metrics, and per-user limits exact across three gateways on one Redis and
two gateways on a Redis Cluster."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.app import Gateway
from tests.conftest import free_port
from tests.gw import admin_url, running_gateway
from tests.integration.test_identity import (
    _RSA,
    _RSA2,
    _alg_none,
    _bearer,
    _cfg,
    _get,
    _hs256_with_public_key,
    _token,
)

pytestmark = pytest.mark.timeout(90)

ISSUER, AUDIENCE = "https://auth.example.com", "api"
_EC = ec.generate_private_key(ec.SECP256R1())
_ED = ed25519.Ed25519PrivateKey.generate()


def _jwk(public: Any, algorithm: Any, kid: str, alg: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


def _jwks_of(*keys: dict[str, Any]) -> str:
    return json.dumps({"keys": list(keys)})


RSA_JWK = _jwk(_RSA.public_key(), RSAAlgorithm, "k0", "RS256")
RSA2_JWK = _jwk(_RSA2.public_key(), RSAAlgorithm, "k1", "RS256")
EC_JWK = _jwk(_EC.public_key(), ECAlgorithm, "ec", "ES256")
ED_JWK = _jwk(_ED.public_key(), OKPAlgorithm, "ed", "EdDSA")


def _signed(key: Any = _RSA, alg: str = "RS256", kid: str = "k0", **claims: Any) -> str:
    """A token with the issuer and audience the gateway expects, unless ``claims`` differ."""
    now = int(time.time())
    body = {"sub": "u", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, **claims}
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid}
    )


def _forged(n: int) -> list[str]:
    """``n`` distinct well-formed RS256 tokens of the known kid with a wrong signature."""
    signature = _signed().rsplit(".", 1)[1]
    return [_signed(sub=f"forged-{i}").rsplit(".", 1)[0] + "." + signature for i in range(n)]


def _config(upstream: str, tmp_path: Path, **jwt_options: Any) -> dict[str, Any]:
    cfg = _cfg(
        upstream,
        tmp_path,
        per_user={"requests": 1000, "period_s": 1, "key": "jwt:sub"},
    )
    (tmp_path / "jwks.json").write_text(_jwks_of(RSA_JWK, EC_JWK, ED_JWK))
    cfg["identity"]["jwt"].update(issuer=ISSUER, audience=AUDIENCE, **jwt_options)
    cfg["trusted_proxies"] = ["127.0.0.1/32"]
    return cfg


def _from(ip: str, token: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": ip}
    if token is not None:
        headers.update(_bearer(token))
    return headers


async def _verifications(s: aiohttp.ClientSession, gw: Gateway) -> dict[tuple[str, str], float]:
    async with s.get(admin_url(gw, "/metrics")) as r:
        text = await r.text()
    found = re.findall(
        r'^gateway_identity_verifications_total\{kind="([^"]+)",result="([^"]+)"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return {(kind, result): float(value) for kind, result, value in found}


# ------------------------------------------------------------ each invalid token


def _unsigned(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    def b64(d: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(claims)}.c2lnbmF0dXJl"


INVALID = {
    "bad-signature": (_forged(1)[0], "bad_signature"),
    "alg-none": (_alg_none("u"), "algorithm"),
    "hs256-signed-with-the-rsa-public-key": (_hs256_with_public_key("u"), "algorithm"),
    "expired": (_signed(exp=int(time.time()) - 3600), "expired"),
    "nbf-beyond-leeway": (_signed(nbf=int(time.time()) + 3600), "not_yet_valid"),
    "wrong-issuer": (_signed(iss="https://evil.example.com"), "wrong_issuer"),
    "wrong-audience": (_signed(aud="other"), "wrong_audience"),
    "missing-exp": (_signed(exp=None), "missing_claim"),
    "unknown-kid": (_signed(kid="nope"), "unknown_key"),
    "key-of-another-family": (_signed(kid="ec"), "unknown_key"),
    "signed-by-a-key-not-in-the-jwks": (_signed(key=_RSA2), "bad_signature"),
    "malformed": ("not-a-jwt", "malformed"),
    "malformed-header": (_unsigned({"alg": 5}, {"sub": "u"}), "algorithm"),
    "too-large": (_signed(pad="p" * 9000), "too_large"),
}


@pytest.mark.parametrize(("token", "reason"), list(INVALID.values()), ids=list(INVALID))
async def test_each_invalid_token_is_refused_and_counted_by_reason(
    upstream: str, tmp_path: Path, token: str, reason: str
) -> None:
    async with running_gateway(_config(upstream, tmp_path)) as gw, aiohttp.ClientSession() as s:
        status, body, headers = await _get(s, gw, "/me", _bearer(token))
        assert status == 401
        assert headers["WWW-Authenticate"] == "Bearer"
        assert token not in body
        counts = await _verifications(s, gw)
        assert counts == {("jwt", reason): 1.0}


@pytest.mark.parametrize(
    "token",
    [_signed(), _signed(_EC, "ES256", "ec"), _signed(_ED, "EdDSA", "ed")],
    ids=["RS256", "ES256", "EdDSA"],
)
async def test_valid_tokens_of_each_key_type_from_the_jwks_file(
    upstream: str, tmp_path: Path, token: str
) -> None:
    async with running_gateway(_config(upstream, tmp_path)) as gw, aiohttp.ClientSession() as s:
        for _ in range(2):  # verified, then from the cache
            assert (await _get(s, gw, "/me", _bearer(token)))[0] == 200
        assert await _verifications(s, gw) == {("jwt", "valid"): 2.0}


async def test_a_key_rotation_by_file_rewrite_and_reload(upstream: str, tmp_path: Path) -> None:
    cfg = _config(upstream, tmp_path)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    old, new = _signed(), _signed(_RSA2, kid="k1")
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        assert (await _get(s, gw, "/me", _bearer(old)))[0] == 200  # verified and cached
        assert (await _get(s, gw, "/me", _bearer(new)))[0] == 401
        (tmp_path / "jwks.json").write_text(_jwks_of(RSA2_JWK))  # k0 retired, k1 in
        ok, errors = await gw.reloader.reload("test")
        assert ok, errors
        assert (await _get(s, gw, "/me", _bearer(new)))[0] == 200
        # the retired key's token no longer passes, though it was verified before
        assert (await _get(s, gw, "/me", _bearer(old)))[0] == 401


# ------------------------------------------------------------ failed verifications


async def test_fresh_forged_tokens_get_a_bounded_number_of_signature_checks(
    upstream: str, tmp_path: Path
) -> None:
    cfg = _config(upstream, tmp_path, max_failed_per_ip=5, failed_window_s=3600)
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        forged = _forged(60)
        # a route without auth: forged tokens are no identity, the address's budget applies
        statuses = [(await _get(s, gw, "/x", _from("198.51.100.7", t)))[0] for t in forged[:50]]
        assert statuses == [200] * 50
        counts = await _verifications(s, gw)
        assert counts == {("jwt", "bad_signature"): 5.0, ("jwt", "throttled"): 45.0}
        # another address is checked as before, and its valid token passes
        assert (await _get(s, gw, "/me", _from("198.51.100.8", forged[50])))[0] == 401
        assert (await _get(s, gw, "/me", _from("198.51.100.8", _signed())))[0] == 200
        # the throttled address: a new token gets no check, and a 401 where one is needed;
        # the token verified before (cached) still passes
        assert (await _get(s, gw, "/me", _from("198.51.100.7", _signed(sub="v"))))[0] == 401
        assert (await _get(s, gw, "/me", _from("198.51.100.7", _signed())))[0] == 200
        counts = await _verifications(s, gw)
        assert counts[("jwt", "bad_signature")] == 6.0
        assert counts[("jwt", "throttled")] == 46.0
        assert counts[("jwt", "valid")] == 2.0


async def test_the_budget_of_failed_checks_outlives_a_reload(upstream: str, tmp_path: Path) -> None:
    cfg = _config(upstream, tmp_path, max_failed_per_ip=3, failed_window_s=3600)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    forged = _forged(6)
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        for t in forged[:4]:
            await _get(s, gw, "/me", _from("198.51.100.11", t))
        cfg["routes"][0]["methods"] = ["GET"]  # another config, the same budget
        path.write_text(yaml.safe_dump(cfg))
        ok, errors = await gw.reloader.reload("test")
        assert ok, errors
        await _get(s, gw, "/me", _from("198.51.100.11", forged[4]))
        counts = await _verifications(s, gw)
        assert counts == {("jwt", "bad_signature"): 3.0, ("jwt", "throttled"): 2.0}
        # a new budget (another rate) starts afresh
        cfg["identity"]["jwt"]["max_failed_per_ip"] = 4
        path.write_text(yaml.safe_dump(cfg))
        ok, errors = await gw.reloader.reload("test")
        assert ok, errors
        await _get(s, gw, "/me", _from("198.51.100.11", forged[5]))
        assert (await _verifications(s, gw))[("jwt", "bad_signature")] == 4.0


async def test_explain_answers_as_the_budget_stands_and_spends_none(
    upstream: str, tmp_path: Path
) -> None:
    cfg = _config(upstream, tmp_path, max_failed_per_ip=2, failed_window_s=3600)
    admin = "explain-admin-token-0123456789"
    forged = _forged(8)
    fresh = _signed(sub="fresh")

    async def explain(s: aiohttp.ClientSession, gw: Gateway, ip: str, token: str) -> Any:
        query = {"ip": ip, "path": "/me", "header": f"Authorization:Bearer {token}"}
        auth = {"Authorization": f"Bearer {admin}"}
        async with s.get(admin_url(gw, "/admin/explain"), params=query, headers=auth) as r:
            assert r.status == 200
            return await r.json()

    async with (
        running_gateway(cfg, {"GATEWAY_ADMIN_TOKEN": admin}) as gw,
        aiohttp.ClientSession() as s,
    ):
        for t in forged[:3]:
            await _get(s, gw, "/me", _from("198.51.100.12", t))
        # the spent address: its new token would be refused unchecked
        body = await explain(s, gw, "198.51.100.12", fresh)
        assert body["identity"] is None
        assert body["verdict"].startswith("401")
        assert (await explain(s, gw, "198.51.100.13", fresh))["identity"] == "jwt:fresh"
        # explaining forged tokens spends nothing: the address still gets its checks
        for t in forged[3:7]:
            assert (await explain(s, gw, "198.51.100.14", t))["identity"] is None
        await _get(s, gw, "/me", _from("198.51.100.14", forged[7]))
        counts = await _verifications(s, gw)
        assert counts == {("jwt", "bad_signature"): 3.0, ("jwt", "throttled"): 1.0}


async def test_failed_verifications_are_scored_where_the_route_needs_a_token(
    upstream: str, tmp_path: Path
) -> None:
    cfg = _config(upstream, tmp_path, max_failed_per_ip=2)
    cfg["abuse"] = {"enabled": True, "ban_score": 9, "scores": {"auth_failure": 3}}
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        forged = _forged(10)
        # no auth on the route: a forged token is no identity, and no auth failure
        for t in forged[:5]:
            assert (await _get(s, gw, "/x", _from("198.51.100.9", t)))[0] == 200
        # auth: jwt -> 401 scored as auth_failure, checked or throttled alike
        statuses = [(await _get(s, gw, "/me", _from("198.51.100.10", t)))[0] for t in forged[5:]]
        assert statuses == [401, 401, 401, 403, 403]
        assert (await _get(s, gw, "/x", _from("198.51.100.9")))[0] == 200


async def test_api_keys_are_counted_without_the_key(upstream: str, tmp_path: Path) -> None:
    from tests.integration.test_identity import API_KEY

    async with running_gateway(_config(upstream, tmp_path)) as gw, aiohttp.ClientSession() as s:
        assert (await _get(s, gw, "/keys", {"X-API-Key": API_KEY}))[0] == 200
        assert (await _get(s, gw, "/keys", {"X-API-Key": "wrong"}))[0] == 401
        assert await _verifications(s, gw) == {("api_key", "valid"): 1, ("api_key", "unknown"): 1}
        async with s.get(admin_url(gw, "/metrics")) as r:
            assert API_KEY not in await r.text()


# ------------------------------------------------------------ replicas


def _replica(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **cfg,
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
    }


async def _exact_per_user(
    replicas: tuple[Gateway, ...], s: aiohttp.ClientSession, burst: int, requests: int
) -> list[int]:
    tokens = [_token("frank") for _ in range(3)]  # one user, several tokens

    async def hit(i: int) -> int:
        gw = replicas[i % len(replicas)]
        return (await _get(s, gw, "/x", _bearer(tokens[i % 3])))[0]

    statuses = await asyncio.gather(*(hit(i) for i in range(requests)))
    assert statuses.count(200) == burst
    assert statuses.count(429) == requests - burst
    return statuses


def _redis_cfg(upstream: str, tmp_path: Path, burst: int) -> dict[str, Any]:
    policy = f"u-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(
        upstream,
        tmp_path,
        **{policy: {"requests": 1, "period_s": 60, "burst": burst, "key": "jwt:sub"}},
    )
    cfg["rate_limit"]["backend"] = "redis"
    return cfg


async def test_three_gateways_on_one_redis_are_exact_per_user(
    redis_url: str, upstream: str, tmp_path: Path
) -> None:
    cfg = _redis_cfg(upstream, tmp_path, burst=7)
    env = {"GATEWAY_REDIS_URL": redis_url}
    async with (
        running_gateway(cfg, env) as a,
        running_gateway(_replica(cfg), env) as b,
        running_gateway(_replica(cfg), env) as c,
        aiohttp.ClientSession() as s,
    ):
        await _exact_per_user((a, b, c), s, burst=7, requests=30)
        # another user has a budget of its own on every replica
        for gw in (a, b, c):
            assert (await _get(s, gw, "/x", _bearer(_token(f"other-{gw.proxy_port}"))))[0] == 200


async def test_two_gateways_on_a_redis_cluster_are_exact_per_user(
    cluster_url: str, upstream: str, tmp_path: Path
) -> None:
    cfg = _redis_cfg(upstream, tmp_path, burst=5)
    cfg["abuse"] = {"enabled": True}  # the ban store on the cluster too (no ban reached)
    env = {"GATEWAY_REDIS_URL": cluster_url}
    async with (
        running_gateway(cfg, env) as a,
        running_gateway(_replica(cfg), env) as b,
        aiohttp.ClientSession() as s,
    ):
        await _exact_per_user((a, b), s, burst=5, requests=20)
        # many users spread over the cluster's slots: each exact
        users = [f"user-{n}" for n in range(12)]
        statuses: dict[str, list[int]] = {u: [] for u in users}
        for _ in range(6):
            for n, u in enumerate(users):
                gw = (a, b)[n % 2]
                statuses[u].append((await _get(s, gw, "/x", _bearer(_token(u))))[0])
        assert all(v == [200] * 5 + [429] for v in statuses.values()), statuses
        assert a.runtime.limiter.backend_ok
        assert b.runtime.limiter.backend_ok
