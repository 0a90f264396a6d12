"""Verified JWTs (SPEC section 11): which tokens count as an identity, and their claims.

Verification is PyJWT's, with the algorithm pinned by the key, never by the token:

- ``RS256``, ``ES256`` and ``EdDSA`` tokens verify only against a public key of the JWKS
  file of that family (RSA, EC P-256, OKP Ed25519), chosen by ``kid`` when the token names
  one; ``HS256`` tokens verify only against the shared secret. So ``alg: none``, an
  ``HS256`` token signed with an RSA public key as its secret, or an ``RS256`` token
  against an HMAC secret, never verify: no key of the right family is ever offered.
- ``exp`` is required; ``nbf``, and ``iss``/``aud`` when configured, are checked, each
  with ``leeway_s``.

Verified tokens are cached until their ``exp``, so a client that sends the same token
again costs one dict look-up instead of a signature check. The look-up is by the token's
last :data:`_TAIL_CHARS` characters (its signature's), and an entry counts only when its
whole token equals the one sent: a token's text is new on every request, so a dict keyed
by the whole token would hash all of it every time (a SHA-256 of it, more again), where
the tail is a short hash and the comparison one ``memcmp``. Two tokens that share a
tail are two tokens: the one sent is verified as any unknown one. The cache is bounded in
entries and in characters (:data:`CACHE_CHARS`), the oldest entry going first; only
verified tokens enter it, so only tokens the issuer signed take its room. Refused tokens
are not cached: caching them would let garbage push valid tokens out.

A signature check is the costly part (tens of microseconds for RS256, more on a busy
machine), and a fresh forged token costs one before any rate limit applies. So:

- what can be refused without one is refused first: a token over
  :data:`MAX_TOKEN_CHARS`, a header that does not parse, an algorithm not allowed, a
  ``kid`` with no key of the token's algorithm;
- with a :class:`~gateway.core.failure_budget.FailureBudget` and the client's key, each
  refusal after a signature check spends one failure of that client, and a client whose
  budget is spent gets no check at all (``throttled``) until it refills. Its tokens
  already verified (cached) still pass.

Nothing here logs a token; refusals carry a short reason (``expired``, ``bad_signature``,
...) for logs and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import jwt
import orjson
from jwt.api_jwk import PyJWK

if TYPE_CHECKING:
    from gateway.core.failure_budget import FailureBudget

__all__ = [
    "ASYMMETRIC",
    "MAX_TOKEN_CHARS",
    "JwksError",
    "Refused",
    "TokenVerifier",
    "Verified",
    "bearer_token",
    "load_jwks",
]

ASYMMETRIC = frozenset({"RS256", "ES256", "EdDSA"})
"""The algorithms a JWKS key may verify (each key serves exactly one of them)."""

MAX_TOKEN_CHARS = 8192
"""Longer tokens are refused unread (``too_large``): real ones are a few hundred bytes
to a few KiB, and every byte is base64- and JSON-decoded before the signature check."""

CACHE_CHARS = 8 << 20
"""At most this many characters of tokens are kept in the cache of verified tokens."""

# the cache's look-up key: the end of the signature (43 characters or more, whatever the
# algorithm), which a client cannot choose for a token the issuer signed; 96 bits, so two
# verified tokens practically never share one (if they do, each is verified again)
_TAIL_CHARS: Final = 16

_KTY = {"RS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}
_CURVE = {"ES256": "P-256", "EdDSA": "Ed25519"}
_MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})


class JwksError(ValueError):
    """A JWKS document that cannot be used; the message names the key."""


@dataclass(slots=True, eq=False)
class Verified:
    """A verified token's claims; cached with the token until ``expires_at``."""

    claims: Mapping[str, Any]
    expires_at: float
    # what the caller made of the claims, kept with the cache entry so that a repeated
    # token costs no more than the look-up (the resolver keeps its RequestIdentity here)
    memo: Any = None


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` field (scheme in any case)."""
    if authorization is None or len(authorization) < 8:
        return None
    if authorization.startswith("Bearer "):  # the usual spelling: no split, no case fold
        return authorization[7:].strip(" ") or None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip(" ")
    return token or None


def load_jwks(text: str) -> dict[str | None, list[PyJWK]]:
    """The public keys of a JWKS document, by ``kid`` (``None`` for keys without one).

    Raises :class:`JwksError` for a document that is not JSON, has no ``keys`` list, or
    holds a key that is not a public RSA, EC P-256 or Ed25519 key.
    """
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise JwksError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('not a JWKS document: expected {"keys": [...]}')
    keys: dict[str | None, list[PyJWK]] = {}
    for n, entry in enumerate(data["keys"]):
        where = f"keys[{n}]"
        if not isinstance(entry, dict):
            raise JwksError(f"{where}: not an object")
        if not _PRIVATE_MEMBERS.isdisjoint(entry):
            raise JwksError(f"{where}: holds private key material; the JWKS takes public keys")
        if entry.get("use", "sig") != "sig":
            continue  # an encryption key: not ours to verify with
        alg = entry.get("alg")
        if alg is not None and alg not in ASYMMETRIC:
            raise JwksError(f"{where}: alg {alg!r} is not one of {sorted(ASYMMETRIC)}")
        try:
            key = PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise JwksError(f"{where}: {exc}") from None
        name = key.algorithm_name
        if name not in ASYMMETRIC or entry.get("kty") != _KTY[name]:
            raise JwksError(f"{where}: {entry.get('kty')} keys for {name} are not supported")
        if name in _CURVE and entry.get("crv") != _CURVE[name]:
            raise JwksError(f"{where}: curve {entry.get('crv')!r} is not {_CURVE[name]}")
        bits = getattr(key.key, "key_size", _MIN_RSA_BITS) if name == "RS256" else _MIN_RSA_BITS
        if bits < _MIN_RSA_BITS:
            # a short modulus can be factored, and then anyone signs any token
            raise JwksError(f"{where}: RSA key of {bits} bits; RFC 7518 3.3 requires 2048 or more")
        kid = entry.get("kid")
        keys.setdefault(kid if isinstance(kid, str) else None, []).append(key)
    return keys


class TokenVerifier:
    """Verifies bearer tokens against a JWKS and an optional HS256 secret."""

    __slots__ = (
        "_all_keys",
        "_audience",
        "_cache",
        "_cache_chars",
        "_cache_size",
        "_clock",
        "_issuer",
        "_keys",
        "_leeway",
        "_options",
        "_secret",
    )

    def __init__(
        self,
        *,
        keys: Mapping[str | None, list[PyJWK]],
        hs256_secret: bytes | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = dict(keys)
        self._all_keys = [k for ks in keys.values() for k in ks]
        self._secret = hs256_secret or None
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        # the token's tail -> (token, outcome), oldest first
        self._cache: dict[str, tuple[str, Verified]] = {}
        self._cache_size = cache_size
        self._cache_chars = 0
        self._clock = clock
        self._options: dict[str, Any] = {
            "require": ["exp"],
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
        }

    def verify(
        self,
        token: str,
        *,
        client: str | None = None,
        failures: FailureBudget | None = None,
        spend: bool = True,
    ) -> Verified | Refused:
        """The token's claims, or why it is refused. With ``failures`` and the ``client``'s
        key, a refusal after a signature check spends one of that client's failures
        (unless ``spend`` is false: a question, not a request), and a client with none
        left gets no check (``throttled``)."""
        cache = self._cache
        tail = token[-_TAIL_CHARS:]
        entry = cache.get(tail)
        if entry is not None and entry[0] == token:  # this very token, verified before
            hit = entry[1]
            if self._clock() < hit.expires_at + self._leeway:
                return hit
            del cache[tail]
            self._cache_chars -= len(token)
            return Refused("expired")
        if len(token) > MAX_TOKEN_CHARS:
            return Refused("too_large")
        if (
            failures is not None
            and client is not None
            and failures.exhausted(client, self._clock())
        ):
            return Refused("throttled")
        outcome, checked = self._verify(token)
        if isinstance(outcome, Verified):
            if entry is not None:  # another token with this tail: this one takes its place
                del cache[tail]
                self._cache_chars -= len(entry[0])
            self._cache_chars += len(token)
            while cache and (len(cache) >= self._cache_size or self._cache_chars > CACHE_CHARS):
                oldest = next(iter(cache))
                self._cache_chars -= len(cache.pop(oldest)[0])
            cache[tail] = (token, outcome)
        elif checked and spend and failures is not None and client is not None:
            failures.spend(client, self._clock())
        return outcome

    def _verify(self, token: str) -> tuple[Verified | Refused, bool]:
        """The outcome, and whether a signature was checked to reach it."""
        try:
            # a JWT is ASCII; aiohttp (the upgrade path) leaves bytes that are not UTF-8
            # as lone surrogates, which the parser would fail to encode
            header = jwt.get_unverified_header(token) if token.isascii() else None
        except jwt.PyJWTError:
            header = None
        if header is None:
            return Refused("malformed"), False
        alg = header.get("alg")
        candidates = self._candidates(alg, header.get("kid"))
        if isinstance(candidates, Refused):
            return candidates, False
        algorithms = [str(alg)]  # one of the known names: _candidates checked it
        reason = "bad_signature"
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options=self._options,  # type: ignore[arg-type]
                )
            except jwt.PyJWTError as exc:
                reason = _reason(exc)
                if reason in {"bad_signature", "malformed"}:
                    continue  # another key of the same kid may have signed it
                return Refused(reason), True
            exp = claims.get("exp")
            if not isinstance(exp, int | float) or isinstance(exp, bool) or not _writable(claims):
                return Refused("malformed"), True
            return Verified(claims, float(exp)), True
        return Refused(reason), True

    def _candidates(self, alg: object, kid: object) -> list[Any] | Refused:
        """The keys that may verify a token of ``alg``: the key decides, never the token."""
        if alg == "HS256":
            return [self._secret] if self._secret is not None else Refused("algorithm")
        if alg not in ASYMMETRIC:
            return Refused("algorithm")
        pool = self._keys.get(kid, []) if isinstance(kid, str) else self._all_keys
        keys = [k.key for k in pool if k.algorithm_name == alg]
        return keys or Refused("unknown_key")


def _writable(claims: Mapping[str, Any]) -> bool:
    """Whether what the gateway writes of the claims (keys, the access log) can be
    written: JSON allows a lone surrogate (``\\ud800``) and integers of any size."""
    try:
        orjson.dumps(claims)
    except TypeError:
        return False
    return True


_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    """A short, token-free word for a refusal (logs and metrics carry it)."""
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed"
