"""The bench's identity: an RS256 key made for the run, its JWKS file and one token.

Every benchmarked request carries the same valid token (``Authorization: Bearer``), as a
client of an API does between refreshes: the gateway verifies it once and then finds it
in its cache of verified tokens. The key is made fresh each run and never written out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

SUBJECT = "bench-user"
KID = "bench"


def make_identity(
    tmp: Path, key: rsa.RSAPrivateKey | None = None, exp: int | None = None
) -> tuple[Path, str]:
    """Write a JWKS with an RS256 public key under ``tmp``; (its path, a token).

    ``key``: a fresh one when None; ``exp``: a week from now when None (given both, the
    token is the same from run to run, as an instruction count wants)."""
    if key is None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=KID, alg="RS256", use="sig")
    path = tmp / "bench-jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    claims = {"sub": SUBJECT, "exp": exp if exp is not None else int(time.time()) + 7 * 86400}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
    return path, token


def fill_config(cfg: dict[str, Any], jwks: Path) -> dict[str, Any]:
    """The bench config (``gateway-memory.yaml`` as loaded) with the run's JWKS file."""
    cfg["identity"]["jwt"]["jwks_file"] = str(jwks)
    return cfg
