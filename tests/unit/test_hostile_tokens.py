"""Tokens made by an attacker who knows the verifier: each must be refused, cheaply."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.identity.api_keys import ApiKey, ApiKeyError, ApiKeys
from gateway.identity.tokens import JwksError, Refused, TokenVerifier, Verified, load_jwks

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SECRET = b"s" * 32


def _public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, alg="RS256", use="sig")
    return jwk


def _verifier() -> TokenVerifier:
    jwks = json.dumps({"keys": [_public_jwk(KEY, "k1")]})
    return TokenVerifier(keys=load_jwks(jwks), hs256_secret=SECRET)


def _claims() -> dict[str, Any]:
    return {"sub": "mallory", "exp": int(time.time()) + 600}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "headers",
    [
        # the key to verify with, named or carried by the token itself: never used
        {"kid": "k1", "jwk": _public_jwk(ATTACKER, "k1")},
        {"jwk": _public_jwk(ATTACKER, "a")},
        {"kid": "k1", "jku": "https://attacker.example/jwks.json"},
        {"kid": "k1", "x5u": "https://attacker.example/cert.pem"},
        {"kid": "../../../../dev/null"},
        {"kid": "k" * 100_000},
    ],
    ids=["jwk-with-kid", "jwk", "jku", "x5u", "kid-path", "kid-huge"],
)
def test_a_token_never_chooses_its_own_key(headers: dict[str, Any]) -> None:
    token = jwt.encode(_claims(), ATTACKER, algorithm="RS256", headers=headers)
    assert isinstance(_verifier().verify(token), Refused)


def test_an_unknown_critical_header_is_refused_even_with_a_good_signature() -> None:
    """RFC 7515 4.1.11: a recipient that does not understand a ``crit`` name must refuse."""
    v = _verifier()
    good = jwt.encode(_claims(), KEY, algorithm="RS256", headers={"kid": "k1"})
    assert isinstance(v.verify(good), Verified)
    for headers in ({"kid": "k1", "crit": ["exp2"], "exp2": 1}, {"kid": "k1", "crit": "x"}):
        token = jwt.encode(_claims(), KEY, algorithm="RS256", headers=headers)
        assert v.verify(token) == Refused("malformed")


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": "9999999999"},
        {"exp": [9999999999]},
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"exp": True},
        {"nbf": float("nan")},
    ],
    ids=["exp-str", "exp-list", "exp-nan", "exp-inf", "exp-bool", "nbf-nan"],
)
def test_time_claims_of_the_wrong_type_are_refused(claims: dict[str, Any]) -> None:
    token = jwt.encode({**_claims(), **claims}, SECRET, algorithm="HS256")
    assert isinstance(_verifier().verify(token), Refused)


@pytest.mark.parametrize(
    "token",
    [
        # a header several MB deep or wide: refused, no exception of the parser escapes
        _b64(b"[" * 100_000 + b"]" * 100_000) + ".e30.x",
        _b64(json.dumps({"alg": "HS256", "x": [[[[[]]]]] * 200_000}).encode()) + ".e30.x",
        _b64(b'{"alg":"HS256"}') + "." + _b64(b"[" * 100_000) + "." + "x" * 43,
        "a" * 4_000_000,
        "..",
        "\udcff.\udcff.\udcff",
    ],
    ids=["deep-header", "wide-header", "deep-payload", "4MB", "empty-parts", "undecodable"],
)
def test_garbage_of_any_size_is_a_refusal(token: str) -> None:
    assert isinstance(_verifier().verify(token), Refused)


def test_the_verified_cache_stays_bounded() -> None:
    v = TokenVerifier(keys={}, hs256_secret=SECRET, cache_size=8)
    for n in range(50):
        token = jwt.encode({"sub": str(n), "exp": int(time.time()) + 600}, SECRET, "HS256")
        assert isinstance(v.verify(token), Verified)
    assert len(v._cache) == 8  # the bound is the point


def test_a_jwks_with_a_short_rsa_key_is_refused() -> None:
    """RFC 7518 3.3: RS256 keys of 2048 bits or more. A 512-bit modulus is factored in
    hours on one machine, and whoever does it signs any token."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    with pytest.raises(JwksError, match="1024 bits"):
        load_jwks(json.dumps({"keys": [_public_jwk(weak, "weak")]}))
    load_jwks(json.dumps({"keys": [_public_jwk(KEY, "k1")]}))  # 2048: fine


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_the_digest_of_the_empty_key_is_refused_in_a_key_file() -> None:
    """``echo -n "$KEY" | sha256sum`` with ``KEY`` unset lists the empty key's digest:
    then a request with an empty key field would pass as that team."""
    with pytest.raises(ApiKeyError, match=r"keys\[0\]\.sha256: .*empty"):
        ApiKeys.from_text(f"keys:\n  - {{id: team-a, sha256: {EMPTY_SHA256.upper()}}}\n")


def test_an_empty_key_field_is_no_key() -> None:
    keys = ApiKeys([ApiKey("t", None, hashlib.sha256(b"").digest())])
    assert keys.lookup("") is None
