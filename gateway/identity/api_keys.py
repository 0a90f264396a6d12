"""API keys (SPEC section 11): a file of SHA-256 digests, each with an id and a plan.

The file never holds a key, only its digest, so the ConfigMap or Secret that carries it
leaks nothing usable. A presented key is hashed and looked up by its digest; the stored
digest is then compared with :func:`hmac.compare_digest`, so the comparison takes the
same time whatever the bytes. (The look-up by digest leaks nothing of the key either: an
attacker who could time it would learn bytes of a SHA-256 of their own guess.)

File format (YAML or JSON)::

    keys:
      - {id: team-a, sha256: <the key's SHA-256, 64 hex digits>, plan: pro}
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

import yaml

__all__ = ["ApiKey", "ApiKeyError", "ApiKeys"]

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_EMPTY = hashlib.sha256(b"").digest()


class ApiKeyError(ValueError):
    """An API-key file that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    plan: str | None
    digest: bytes


class ApiKeys:
    """The keys of one file, by digest."""

    __slots__ = ("_by_digest",)

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_digest = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_text(cls, text: str) -> ApiKeys:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ApiKeyError(f"not YAML: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ApiKeyError("expected a mapping with a 'keys' list")
        unknown = set(data) - {"keys"}
        if unknown:
            raise ApiKeyError(f"{min(map(str, unknown))}: unknown field")
        keys: list[ApiKey] = []
        ids: set[str] = set()
        digests: set[bytes] = set()
        for n, entry in enumerate(data["keys"]):
            keys.append(_entry(n, entry, ids, digests))
        return cls(keys)

    def lookup(self, raw: str) -> ApiKey | None:
        if not raw:  # an empty field is no key, whatever the file lists
            return None
        digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found.digest, digest):
            return None
        return found


def _entry(n: int, entry: object, ids: set[str], digests: set[bytes]) -> ApiKey:
    where = f"keys[{n}]"
    if not isinstance(entry, dict):
        raise ApiKeyError(f"{where}: expected a mapping with id and sha256")
    unknown = set(entry) - {"id", "sha256", "plan"}
    if unknown:
        raise ApiKeyError(f"{where}.{min(map(str, unknown))}: unknown field")
    key_id, digest, plan = entry.get("id"), entry.get("sha256"), entry.get("plan")
    if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
        raise ApiKeyError(f"{where}.id: 1-128 of [A-Za-z0-9._:@-] required")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise ApiKeyError(f"{where}.sha256: 64 hex digits required (the key's SHA-256)")
    if plan is not None and (not isinstance(plan, str) or not plan):
        raise ApiKeyError(f"{where}.plan: a non-empty string")
    raw = bytes.fromhex(digest)
    if raw == _EMPTY:
        # what `echo -n "$KEY" | sha256sum` gives with KEY unset
        raise ApiKeyError(f"{where}.sha256: the SHA-256 of the empty key (an unset variable?)")
    if key_id in ids:
        raise ApiKeyError(f"{where}.id: {key_id!r} is listed twice")
    if raw in digests:
        raise ApiKeyError(f"{where}.sha256: the same key is listed twice")
    ids.add(key_id)
    digests.add(raw)
    return ApiKey(key_id, plan, raw)
