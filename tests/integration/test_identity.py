"""Identity over real sockets (SPEC 11): verified tokens and API keys as rate-limit keys,
the fallback and the client address for requests without one, route ``auth``, the JWKS
file re-read on reload, and a per-user limit exact across two gateways on one Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import Gateway
from gateway.config import ConfigError, load_text
from tests.conftest import free_port
from tests.gw import AccessLines, base_config, running_gateway, serve, url

pytestmark = pytest.mark.timeout(60)

API_KEY = "key-of-team-a-0123456789"
_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_RSA2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks(*keys: rsa.RSAPrivateKey) -> str:
    out = []
    for n, key in enumerate(keys):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwk.update(kid=f"k{n}", alg="RS256", use="sig")
        out.append(jwk)
    return json.dumps({"keys": out})


def _token(sub: str, *, key: Any = _RSA, alg: str = "RS256", exp_in: float = 600, **kw: Any) -> str:
    claims = {"sub": sub, "exp": int(time.time() + exp_in), **kw}
    return jwt.encode(claims, key, algorithm=alg)


def _alg_none(sub: str) -> str:
    def b64(d: Mapping[str, Any]) -> str:
        import base64

        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return b64({"alg": "none", "typ": "JWT"}) + "." + b64({"sub": sub, "exp": 2**40}) + "."


def _hs256_with_public_key(sub: str) -> str:
    """An HS256 token whose secret is the RSA public key (algorithm confusion)."""
    pem = _RSA.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import base64
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": 2**40}).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """An upstream that answers with the Authorization field it received."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Authorization", "-"))

    async with serve(handler) as url_:
        yield url_


def _files(tmp_path: Path) -> tuple[Path, Path]:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(_jwks(_RSA))
    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys.write_text(f"keys:\n  - {{id: team-a, sha256: {digest}, plan: pro}}\n")
    return jwks, keys


def _cfg(upstream: str, tmp_path: Path, **policies: Any) -> dict[str, Any]:
    jwks, keys = _files(tmp_path)
    names = list(policies)
    return base_config(
        upstream,
        identity={"jwt": {"jwks_file": str(jwks)}, "api_keys": {"file": str(keys)}},
        rate_limit={"policies": policies},
        routes=[
            {"name": "me", "path_prefix": "/me", "upstream": "api", "auth": "jwt"},
            {"name": "keys", "path_prefix": "/keys", "upstream": "api", "auth": "api_key"},
            {"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": names[:1]},
        ],
        abuse={"enabled": False},
    )


async def _get(
    s: aiohttp.ClientSession, gw: Gateway, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, str, Mapping[str, str]]:
    async with s.get(url(gw, path), headers=dict(headers or {})) as r:
        return r.status, await r.text(), r.headers


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_invalid_tokens_share_the_address_budget_valid_ones_get_their_own(
    echo: str, tmp_path: Path
) -> None:
    cfg = _cfg(
        echo, tmp_path, per_user={"requests": 1, "period_s": 60, "burst": 2, "key": "jwt:sub"}
    )
    invalid = [
        None,
        "garbage",
        _token("u1", exp_in=-3600),  # expired
        _alg_none("u1"),
        _hs256_with_public_key("u1"),
        _token("u1", key=_RSA2),  # signed by a key not in the JWKS
        _token("u1", alg="HS256", key="a-secret-that-is-long-enough-for-hs256!"),
    ]
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        statuses = [(await _get(s, gw, "/x", _bearer(t) if t else None))[0] for t in invalid]
        # one address, one budget of 2, whatever garbage rides along
        assert statuses == [200, 200, 429, 429, 429, 429, 429]
        # a valid token: its own budget of 2, its credentials passed on unchanged
        tok = _token("alice")
        for _ in range(2):
            status, body, _ = await _get(s, gw, "/x", _bearer(tok))
            assert status == 200
            assert body == f"Bearer {tok}"
        assert (await _get(s, gw, "/x", _bearer(_token("alice"))))[0] == 429
        assert (await _get(s, gw, "/x", _bearer(_token("bob"))))[0] == 200


async def test_fallback_policy_limits_anonymous_requests_and_names_itself(
    upstream: str, tmp_path: Path
) -> None:
    cfg = _cfg(
        upstream,
        tmp_path,
        per_user={"requests": 1, "period_s": 60, "burst": 5, "key": "jwt:sub", "fallback": "anon"},
        anon={"requests": 1, "period_s": 60, "burst": 1},
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        assert (await _get(s, gw, "/x", _bearer("nope")))[0] == 200
        status, body, _ = await _get(s, gw, "/x")
        assert status == 429
        assert "anon" in body
        assert "per_user" not in body
        assert (await _get(s, gw, "/x", _bearer(_token("carol"))))[0] == 200


async def test_one_token_from_two_addresses_spends_each_address_budget(
    upstream: str, tmp_path: Path
) -> None:
    """The checks a verified token's request makes are kept with the token for the client
    address they were made for: the same token from another address (behind a trusted
    proxy, X-Forwarded-For) spends that address's budget, never the first one's."""
    cfg = _cfg(
        upstream,
        tmp_path,
        per_user={"requests": 1, "period_s": 60, "burst": 50, "key": "jwt:sub"},
        per_ip={"requests": 1, "period_s": 60, "burst": 2, "key": "ip"},
    )
    cfg["routes"][-1]["rate_limits"] = ["per_user", "per_ip"]
    cfg["trusted_proxies"] = ["127.0.0.1/32"]
    token = _token("alice")

    async def status(address: str) -> int:
        headers = {**_bearer(token), "X-Forwarded-For": address}
        return (await _get(s, gw, "/x", headers))[0]

    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        order = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.1", "10.0.0.2"]
        assert [await status(a) for a in order] == [200, 200, 200, 200, 429, 429]
        assert await status("10.0.0.3") == 200


async def test_api_key_ids_are_the_key(upstream: str, tmp_path: Path) -> None:
    cfg = _cfg(
        upstream, tmp_path, per_key={"requests": 1, "period_s": 60, "burst": 1, "key": "api_key"}
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        assert (await _get(s, gw, "/x", {"X-API-Key": API_KEY}))[0] == 200
        assert (await _get(s, gw, "/x", {"X-API-Key": API_KEY}))[0] == 429
        # an unknown key is no identity: the address's budget, spent once
        assert (await _get(s, gw, "/x", {"X-API-Key": "wrong-1"}))[0] == 200
        assert (await _get(s, gw, "/x", {"X-API-Key": "wrong-2"}))[0] == 429
        # auth: api_key
        assert (await _get(s, gw, "/keys", {"X-API-Key": API_KEY}))[0] == 200
        status, _, headers = await _get(s, gw, "/keys", {"X-API-Key": "wrong"})
        assert status == 401
        assert "WWW-Authenticate" not in headers


async def test_route_auth_jwt_answers_401_with_www_authenticate(
    upstream: str, tmp_path: Path
) -> None:
    cfg = _cfg(upstream, tmp_path, per_ip={"requests": 100, "period_s": 1})
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        for headers in (None, _bearer("x.y.z"), _bearer(_alg_none("a")), {"X-API-Key": API_KEY}):
            status, body, h = await _get(s, gw, "/me", headers)
            assert status == 401
            assert h["WWW-Authenticate"] == "Bearer"
            assert h["Content-Type"].startswith("application/problem+json")
            assert "x.y.z" not in body
        assert (await _get(s, gw, "/me", _bearer(_token("dave"))))[0] == 200


async def test_jwks_file_is_reread_on_reload(upstream: str, tmp_path: Path) -> None:
    cfg = _cfg(upstream, tmp_path, per_ip={"requests": 100, "period_s": 1})
    path = tmp_path / "gateway.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    jwks = tmp_path / "jwks.json"
    new = _token("erin", key=_RSA2, headers={"kid": "k1"})
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        assert (await _get(s, gw, "/me", _bearer(new)))[0] == 401
        jwks.write_text(_jwks(_RSA, _RSA2))
        ok, errors = await gw.reloader.reload("test")
        assert ok, errors
        assert (await _get(s, gw, "/me", _bearer(new)))[0] == 200
        # a file that does not parse: a failed reload, the previous keys stay
        jwks.write_text("{not json")
        ok, errors = await gw.reloader.reload("test")
        assert not ok
        assert any("identity.jwt.jwks_file" in e for e in errors)
        assert (await _get(s, gw, "/me", _bearer(new)))[0] == 200


async def test_two_gateways_on_one_redis_are_exact_per_user(
    redis_url: str, upstream: str, tmp_path: Path
) -> None:
    policy = f"u-{uuid.uuid4().hex[:8]}"
    cfg = _cfg(
        upstream,
        tmp_path,
        **{policy: {"requests": 1, "period_s": 60, "burst": 6, "key": "jwt:sub"}},
    )
    cfg["rate_limit"]["backend"] = "redis"
    env = {"GATEWAY_REDIS_URL": redis_url}
    cfg_b = {
        **cfg,
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
    }
    async with (
        running_gateway(cfg, env) as a,
        running_gateway(cfg_b, env) as b,
        aiohttp.ClientSession() as s,
    ):
        replicas = (a, b)
        tokens = [_token("frank") for _ in range(3)]  # one user, several tokens

        async def hit(i: int) -> int:
            return (await _get(s, replicas[i % 2], "/x", _bearer(tokens[i % 3])))[0]

        statuses = await asyncio.gather(*(hit(i) for i in range(20)))
        assert statuses.count(200) == 6
        assert statuses.count(429) == 14


def _load(cfg: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Any:
    import yaml

    return load_text(yaml.safe_dump(dict(cfg)), environ=dict(env or {}))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"fallback": "nope"}, "rate_limit.policies.per_user.fallback"),
        ({"fallback": "per_key"}, "rate_limit.policies.per_user.fallback"),
        ({"key": "jwt:"}, "rate_limit.policies.per_user.key"),
    ],
)
def test_check_config_names_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    per_user = {"requests": 1, "period_s": 60, "key": "jwt:sub", **change}
    cfg = _cfg(
        "http://127.0.0.1:1",
        tmp_path,
        per_user=per_user,
        per_key={"requests": 1, "period_s": 60, "key": "api_key"},
    )
    with pytest.raises(ConfigError) as info:
        _load(cfg)
    assert field in {p.path for p in info.value.problems}


def test_identity_files_that_do_not_parse_or_are_missing(tmp_path: Path) -> None:
    cfg = _cfg("http://127.0.0.1:1", tmp_path, per_ip={"requests": 1, "period_s": 1})
    (tmp_path / "jwks.json").write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    (tmp_path / "keys.yaml").write_text("keys: [{id: a, sha256: xyz}]")
    with pytest.raises(ConfigError) as info:
        _load(cfg)
    assert {p.path for p in info.value.problems} == {
        "identity.jwt.jwks_file",
        "identity.api_keys.file",
    }
    (tmp_path / "jwks.json").unlink()
    (tmp_path / "keys.yaml").unlink()
    settings = _load(cfg)
    warned = {w.path for w in settings.warnings if not w.risky}
    assert {"identity.jwt.jwks_file", "identity.api_keys.file"} <= warned


def test_short_hs256_secret_is_risky(tmp_path: Path) -> None:
    cfg = _cfg("http://127.0.0.1:1", tmp_path, per_ip={"requests": 1, "period_s": 1})
    cfg["identity"]["jwt"]["hs256_secret_env"] = "JWT_SECRET"
    settings = _load(cfg, {"JWT_SECRET": "short"})
    assert any(w.path == "identity.jwt.hs256_secret_env" and w.risky for w in settings.warnings)
    settings = _load(cfg, {"JWT_SECRET": "x" * 32})
    assert not any(w.path == "identity.jwt.hs256_secret_env" for w in settings.warnings)


async def test_access_log_carries_identity_never_the_credential(
    upstream: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(upstream, tmp_path, per_user={"requests": 100, "period_s": 1, "key": "jwt:sub"})
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        log = AccessLines(gw.runtime, monkeypatch)
        tok = _token("gina")
        await _get(s, gw, "/x", _bearer(tok))
        await _get(s, gw, "/keys", {"X-API-Key": API_KEY})
        await _get(s, gw, "/x", _bearer("garbage-token"))
        lines = log.lines
    assert [line.get("identity") for line in lines] == ["jwt:gina", "api_key:team-a", None]
    text = json.dumps(lines)
    assert tok not in text
    assert API_KEY not in text
    assert "garbage-token" not in text


async def test_explain_shows_identity_and_key(upstream: str, tmp_path: Path) -> None:
    cfg = _cfg(upstream, tmp_path, per_user={"requests": 100, "period_s": 1, "key": "jwt:sub"})
    admin = "explain-admin-token-0123456789"
    async with running_gateway(cfg, {"GATEWAY_ADMIN_TOKEN": admin}) as gw:
        assert gw.admin_port is not None
        tok = _token("hana")
        query = {"ip": "10.9.8.7", "path": "/x", "header": f"Authorization:Bearer {tok}"}
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://127.0.0.1:{gw.admin_port}/admin/explain",
                params=query,
                headers={"Authorization": f"Bearer {admin}"},
            ) as r,
        ):
            assert r.status == 200
            body = await r.json()
        assert body["identity"] == "jwt:hana"
        assert body["policies"][0]["key"] == "j:sub:hana"
        query["header"] = "Authorization:Bearer nope"
        query["path"] = "/me"
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://127.0.0.1:{gw.admin_port}/admin/explain",
                params=query,
                headers={"Authorization": f"Bearer {admin}"},
            ) as r,
        ):
            body = await r.json()
        assert body["identity"] is None
        assert body["verdict"].startswith("401")


async def test_the_watcher_rereads_a_changed_jwks_file(upstream: str, tmp_path: Path) -> None:
    import yaml

    cfg = _cfg(upstream, tmp_path, per_ip={"requests": 100, "period_s": 1})
    cfg["reload"] = {"interval_s": 0.05}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    new = _token("ivan", key=_RSA2, headers={"kid": "k1"})
    async with running_gateway(cfg, path=str(path)) as gw, aiohttp.ClientSession() as s:
        assert (await _get(s, gw, "/me", _bearer(new)))[0] == 401
        await asyncio.sleep(0.2)  # the watcher has read the files once
        (tmp_path / "jwks.json").write_text(_jwks(_RSA, _RSA2))
        deadline = asyncio.get_running_loop().time() + 3
        while (await _get(s, gw, "/me", _bearer(new)))[0] != 200:
            assert asyncio.get_running_loop().time() < deadline, "JWKS not re-read"
            await asyncio.sleep(0.05)


async def test_hs256_tokens_verify_with_the_secret_from_the_environment(
    upstream: str, tmp_path: Path
) -> None:
    secret = "s" * 40
    cfg = _cfg(upstream, tmp_path, per_ip={"requests": 100, "period_s": 1})
    cfg["identity"]["jwt"]["hs256_secret_env"] = "JWT_SECRET"
    async with running_gateway(cfg, {"JWT_SECRET": secret}) as gw, aiohttp.ClientSession() as s:
        good = _token("judy", key=secret, alg="HS256")
        assert (await _get(s, gw, "/me", _bearer(good)))[0] == 200
        wrong = _token("judy", key="t" * 40, alg="HS256")
        assert (await _get(s, gw, "/me", _bearer(wrong)))[0] == 401
        # still no algorithm confusion with a secret configured
        assert (await _get(s, gw, "/me", _bearer(_hs256_with_public_key("judy"))))[0] == 401
        assert (await _get(s, gw, "/me", _bearer(_alg_none("judy"))))[0] == 401
