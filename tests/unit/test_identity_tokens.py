"""Verified JWTs: each invalid-token case, algorithm confusion, key choice, the cache."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.core.failure_budget import FailureBudget
from gateway.core.gcra import Rate
from gateway.identity.tokens import (
    JwksError,
    Refused,
    TokenVerifier,
    Verified,
    bearer_token,
    load_jwks,
)

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
SECRET = b"s" * 32


def _jwk(public: Any, algorithm: Any, kid: str | None, **extra: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(public))
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


JWKS = {
    "keys": [
        _jwk(RSA_KEY.public_key(), RSAAlgorithm, "rsa-1", alg="RS256", use="sig"),
        _jwk(EC_KEY.public_key(), ECAlgorithm, "ec-1"),
        _jwk(ED_KEY.public_key(), OKPAlgorithm, None),
    ]
}
ISSUER, AUDIENCE = "https://auth.example.com", "api"


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "user-1", "exp": now + 86400, "iss": ISSUER, "aud": AUDIENCE}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _verifier(**kwargs: Any) -> TokenVerifier:
    options: dict[str, Any] = {
        "keys": load_jwks(json.dumps(JWKS)),
        "hs256_secret": SECRET,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "leeway_s": 30,
    }
    options.update(kwargs)
    return TokenVerifier(**options)


def rs256(claims: dict[str, Any], kid: str | None = "rsa-1", key: Any = RSA_KEY) -> str:
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid} if kid else None)


@pytest.mark.parametrize(
    "make",
    [
        rs256,
        lambda c: rs256(c, kid=None),
        lambda c: jwt.encode(c, EC_KEY, algorithm="ES256", headers={"kid": "ec-1"}),
        lambda c: jwt.encode(c, EC_KEY, algorithm="ES256"),
        lambda c: jwt.encode(c, ED_KEY, algorithm="EdDSA"),
        lambda c: jwt.encode(c, SECRET, algorithm="HS256"),
    ],
    ids=["RS256-kid", "RS256-no-kid", "ES256-kid", "ES256-no-kid", "EdDSA", "HS256"],
)
def test_valid_tokens_verify(make: Callable[[dict[str, Any]], str]) -> None:
    outcome = _verifier().verify(make(_claims()))
    assert isinstance(outcome, Verified)
    assert outcome.claims["sub"] == "user-1"


def _none_token(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, "", algorithm="none")


def _hs256_with_the_rsa_public_key(claims: dict[str, Any]) -> str:
    """The classic algorithm confusion: HS256 keyed with the verifier's public key."""
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    import hashlib
    import hmac

    from jwt.utils import base64url_encode

    header = base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = base64url_encode(json.dumps(claims).encode())
    signature = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    return (header + b"." + body + b"." + base64url_encode(signature)).decode()


def _flip_signature(token: str) -> str:
    head, _, sig = token.rpartition(".")
    return head + "." + ("A" if sig[0] != "A" else "B") + sig[1:]


def _swap_payload(token: str) -> str:
    other = rs256(_claims(sub="admin"))
    head, _, signature = token.split(".")
    return f"{head}.{other.split('.')[1]}.{signature}"


NOW = int(time.time())  # the table is built at import: its times are an hour off, not seconds


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "malformed"),
        ("garbage", "malformed"),
        ("a.b.c", "malformed"),
        ("a.b", "malformed"),
        (_none_token(_claims()), "algorithm"),
        (_hs256_with_the_rsa_public_key(_claims()), "bad_signature"),
        (jwt.encode(_claims(), b"x" * 32, algorithm="HS256"), "bad_signature"),
        (jwt.encode(_claims(), SECRET * 2, algorithm="HS384"), "algorithm"),
        (jwt.encode(_claims(), RSA_KEY, algorithm="RS512"), "algorithm"),
        (jwt.encode(_claims(), RSA_KEY, algorithm="PS256"), "algorithm"),
        (rs256(_claims(), key=OTHER_RSA), "bad_signature"),
        (rs256(_claims(), kid="nope"), "unknown_key"),
        (rs256(_claims(), kid="ec-1"), "unknown_key"),  # an EC key never checks RS256
        (_flip_signature(rs256(_claims())), "bad_signature"),
        (_swap_payload(rs256(_claims())), "bad_signature"),
        (rs256(_claims(exp=NOW - 3600)), "expired"),
        (rs256(_claims(exp=None)), "missing_claim"),
        (rs256(_claims(exp="tomorrow")), "malformed"),
        (rs256(_claims(nbf=NOW + 3600)), "not_yet_valid"),
        (rs256(_claims(iss="https://evil.example.com")), "wrong_issuer"),
        (rs256(_claims(iss=None)), "missing_claim"),
        (rs256(_claims(aud="other")), "wrong_audience"),
        (rs256(_claims(aud=None)), "missing_claim"),
    ],
    ids=[
        "empty",
        "garbage",
        "three-garbage-parts",
        "two-parts",
        "alg-none",
        "hs256-signed-with-rsa-public-key",
        "hs256-wrong-secret",
        "hs384",
        "rs512",
        "ps256",
        "rs256-other-key",
        "unknown-kid",
        "kid-of-another-family",
        "tampered-signature",
        "swapped-payload",
        "expired-past-leeway",
        "no-exp",
        "exp-not-a-number",
        "nbf-future",
        "wrong-issuer",
        "no-issuer",
        "wrong-audience",
        "no-audience",
    ],
)
def test_invalid_tokens_are_refused_with_their_reason(token: str, reason: str) -> None:
    assert _verifier().verify(token) == Refused(reason)


def test_leeway_lets_a_just_expired_token_through() -> None:
    now = int(time.time())
    assert isinstance(_verifier().verify(rs256(_claims(exp=now - 10))), Verified)
    assert isinstance(_verifier().verify(rs256(_claims(nbf=now + 10))), Verified)
    assert _verifier().verify(rs256(_claims(exp=now - 40))) == Refused("expired")
    assert _verifier().verify(rs256(_claims(nbf=now + 40))) == Refused("not_yet_valid")


def test_issuer_and_audience_are_not_checked_when_not_configured() -> None:
    loose = _verifier(issuer=None, audience=None)
    token = rs256(_claims(iss="anyone", aud="anything"))
    assert isinstance(loose.verify(token), Verified)


def test_hs256_needs_a_configured_secret() -> None:
    token = jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert _verifier(hs256_secret=None).verify(token) == Refused("algorithm")


def test_a_verified_token_is_cached_until_it_expires() -> None:
    clock = [time.time()]
    verifier = _verifier(clock=lambda: clock[0], leeway_s=0)
    token = rs256(_claims(exp=int(clock[0]) + 60))
    first = verifier.verify(token)
    assert isinstance(first, Verified)
    assert verifier.verify(token) is first  # from the cache: the same object
    clock[0] += 61
    assert verifier.verify(token) == Refused("expired")


def test_the_cache_is_bounded() -> None:
    verifier = _verifier(cache_size=3)
    tokens = [rs256(_claims(sub=f"u{n}")) for n in range(5)]
    for t in tokens:
        assert isinstance(verifier.verify(t), Verified)
    assert len(verifier._cache) == 3


def test_the_cache_is_bounded_in_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [rs256(_claims(sub=f"u{n}")) for n in range(5)]
    monkeypatch.setattr("gateway.identity.tokens.CACHE_CHARS", 2 * len(tokens[0]) + 10)
    verifier = _verifier()
    for t in tokens:
        assert isinstance(verifier.verify(t), Verified)
    assert [token for token, _ in verifier._cache.values()] == tokens[-2:]
    assert verifier._cache_chars == sum(map(len, tokens[-2:]))


def test_a_token_sharing_a_cached_tokens_tail_is_verified_as_any_other() -> None:
    verifier = _verifier()
    token = rs256(_claims(sub="alice"))
    first = verifier.verify(token)
    assert isinstance(first, Verified)
    tail = token[-16:]
    # another header and claims before the same signature: it does not verify
    forged = rs256(_claims(sub="mallory")).rpartition(".")[0] + "." + token.rpartition(".")[2]
    assert forged[-16:] == tail
    assert verifier.verify(forged) == Refused("bad_signature")
    assert verifier.verify(token) is first  # its entry is untouched
    # a verified token sharing the tail takes the entry's place, counted once
    other = rs256(_claims(sub="bob"))
    verifier._cache[other[-16:]] = verifier._cache.pop(tail)
    assert isinstance(verifier.verify(other), Verified)
    assert verifier.verify(other) is verifier.verify(other)
    assert [t for t, _ in verifier._cache.values()] == [other]
    assert verifier._cache_chars == len(other)


@pytest.mark.parametrize(
    ("field", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER  abc ", "abc"),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearerabc", None),
        (None, None),
        ("", None),
    ],
)
def test_bearer_token(field: str | None, token: str | None) -> None:
    assert bearer_token(field) == token


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JWKS"),
        ('{"keys": {}}', "not a JWKS"),
        ('{"keys": [1]}', r"keys\[0\]: not an object"),
        (
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}),
            r"keys\[0\]: holds private key material",
        ),
        (
            json.dumps({"keys": [{**JWKS["keys"][0], "alg": "HS256"}]}),
            r"keys\[0\]: alg 'HS256'",
        ),
        (
            json.dumps(
                {"keys": [json.loads(RSAAlgorithm.to_jwk(RSA_KEY))]}  # the private key
            ),
            r"keys\[0\]: holds private key material",
        ),
        (json.dumps({"keys": [{"kty": "RSA"}]}), r"keys\[0\]:"),
        (
            json.dumps(
                {
                    "keys": [
                        _jwk(
                            ec.generate_private_key(ec.SECP384R1()).public_key(), ECAlgorithm, None
                        )
                    ]
                }
            ),
            r"keys\[0\]:",
        ),
    ],
)
def test_unusable_jwks_documents_are_refused_with_the_key_named(
    document: str, message: str
) -> None:
    with pytest.raises(JwksError, match=message):
        load_jwks(document)


def test_encryption_keys_are_skipped() -> None:
    enc = _jwk(OTHER_RSA.public_key(), RSAAlgorithm, "enc", use="enc")
    keys = load_jwks(json.dumps({"keys": [enc, JWKS["keys"][0]]}))
    assert list(keys) == ["rsa-1"]


# ------------------------------------------------------------ failed verifications


def _fresh_forgeries(n: int) -> list[str]:
    """``n`` distinct well-formed RS256 tokens of a known kid with a wrong signature: each
    costs a signature check unless the gateway refuses it before."""
    signature = rs256(_claims()).rsplit(".", 1)[1]
    out = []
    for i in range(n):
        head, body, _ = rs256(_claims(sub=f"forged-{i}")).split(".")
        out.append(f"{head}.{body}.{signature}")
    return out


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times PyJWT is asked to check a signature."""
    count = [0]
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return count


def test_fresh_forged_tokens_cost_a_bounded_number_of_signature_checks(
    decodes: list[int],
) -> None:
    clock = [1000.0 + time.time()]
    verifier = _verifier(clock=lambda: clock[0])
    budget = FailureBudget(Rate(10, 60.0, 10))
    forged = _fresh_forgeries(200)
    outcomes = [verifier.verify(t, client="198.51.100.7", failures=budget) for t in forged]
    assert decodes[0] == 10
    assert outcomes[:10] == [Refused("bad_signature")] * 10
    assert outcomes[10:] == [Refused("throttled")] * 190
    # another client is verified as before
    assert verifier.verify(forged[0], client="198.51.100.8", failures=budget) == Refused(
        "bad_signature"
    )
    # the budget refills: one more check every 6 s
    clock[0] += 6
    assert verifier.verify(forged[1], client="198.51.100.7", failures=budget) == Refused(
        "bad_signature"
    )
    assert verifier.verify(forged[2], client="198.51.100.7", failures=budget) == Refused(
        "throttled"
    )


def test_a_throttled_client_keeps_its_verified_tokens_and_explain_is_not_throttled(
    decodes: list[int],
) -> None:
    verifier = _verifier()
    budget = FailureBudget(Rate(2, 60.0, 2))
    good = rs256(_claims(sub="nat-user"))
    assert isinstance(verifier.verify(good, client="203.0.113.1", failures=budget), Verified)
    for t in _fresh_forgeries(5):
        verifier.verify(t, client="203.0.113.1", failures=budget)
    assert isinstance(verifier.verify(good, client="203.0.113.1", failures=budget), Verified)
    # a new token from that address waits for the refill, like a forged one
    fresh = rs256(_claims(sub="nat-user-2"))
    assert verifier.verify(fresh, client="203.0.113.1", failures=budget) == Refused("throttled")
    # without a budget (/admin/explain), a token is always checked
    assert isinstance(verifier.verify(fresh), Verified)


@pytest.mark.parametrize(
    "token",
    [
        "x" * 9000,
        rs256(_claims(pad="p" * 9000)),
        _none_token(_claims()),
        rs256(_claims(), kid="nope"),
        jwt.encode(_claims(), RSA_KEY, algorithm="RS512"),
        "a.b.c",
    ],
    ids=["huge-garbage", "huge-token", "alg-none", "unknown-kid", "rs512", "garbage"],
)
def test_cheap_refusals_check_no_signature_and_spend_no_budget(
    decodes: list[int], token: str
) -> None:
    budget = FailureBudget(Rate(1, 60.0, 1))
    verifier = _verifier()
    for _ in range(3):
        assert isinstance(verifier.verify(token, client="c", failures=budget), Refused)
    assert decodes[0] == 0
    assert len(budget) == 0


def test_every_refusal_after_a_signature_check_spends_the_budget(decodes: list[int]) -> None:
    budget = FailureBudget(Rate(1, 60.0, 1))
    verifier = _verifier()
    expired = rs256(_claims(exp=int(time.time()) - 3600))
    assert verifier.verify(expired, client="c", failures=budget) == Refused("expired")
    assert verifier.verify(rs256(_claims()), client="c", failures=budget) == Refused("throttled")
    assert decodes[0] == 1
