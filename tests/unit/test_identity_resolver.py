"""A request's identity from its bearer token: the same token, the same identity, for as
long as the token verifies (no longer)."""

from __future__ import annotations

import json
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm
from multidict import CIMultiDict

from gateway.identity.resolver import NO_IDENTITY, IdentityKeys, RequestIdentity
from gateway.identity.tokens import TokenVerifier, load_jwks

KEY = ed25519.Ed25519PrivateKey.generate()
JWKS = json.dumps({"keys": [json.loads(OKPAlgorithm.to_jwk(KEY.public_key()))]})


def _keys(clock: list[float], plan_claim: str | None = None) -> IdentityKeys:
    verifier = TokenVerifier(keys=load_jwks(JWKS), leeway_s=0, clock=lambda: clock[0])
    return IdentityKeys(verifier, None, None, plan_claim)


def _fields(token: str) -> CIMultiDict[str]:
    return CIMultiDict([("Authorization", f"Bearer {token}")])


def test_one_token_one_identity_until_it_expires() -> None:
    clock = [time.time()]
    keys = _keys(clock, plan_claim="plan")
    token = jwt.encode(
        {"sub": "alice", "plan": "pro", "exp": int(clock[0]) + 60}, KEY, algorithm="EdDSA"
    )
    first = keys.identify(_fields(token))
    again = keys.identify(_fields(token))
    assert first.claims is not None
    assert first.claims["sub"] == "alice"
    assert first.plan == "pro"
    assert again == first
    clock[0] += 61
    assert keys.identify(_fields(token)) is NO_IDENTITY  # expired: not kept by the resolver


def test_two_tokens_two_identities() -> None:
    clock = [time.time()]
    keys = _keys(clock)
    exp = int(clock[0]) + 60
    a = jwt.encode({"sub": "alice", "exp": exp}, KEY, algorithm="EdDSA")
    b = jwt.encode({"sub": "bob", "exp": exp}, KEY, algorithm="EdDSA")
    for _ in range(2):
        assert keys.identify(_fields(a)).label == "jwt:alice"
        assert keys.identify(_fields(b)).label == "jwt:bob"


def test_labels() -> None:
    assert RequestIdentity(claims={"sub": "alice"}).label == "jwt:alice"
    assert RequestIdentity(claims={"sub": 7}).label == "jwt:"  # not a string: no subject
    assert RequestIdentity(claims={}, api_key="team-a").label == "jwt:"
    assert RequestIdentity(api_key="team-a").label == "api_key:team-a"
    assert NO_IDENTITY.label is None
    assert RequestIdentity(api_key="a") == RequestIdentity(api_key="a")
