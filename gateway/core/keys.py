"""Client keys of rate-limit policies: one function for the pipeline, both backends and
``/admin/explain``, so they always agree on whose budget a request spends.

A key value the client chooses (a header today; JWT claims and body values later) is
never truncated: two values that share a long prefix (bearer tokens with the same JWT
header and claims) are two clients. A value of at most :data:`MAX_VALUE_BYTES` bytes is
kept as it is; a longer one is replaced by the SHA-256 digest of all its bytes, in
unpadded base64url (43 characters), so a key stays small whatever the client sends.
The two forms have apart prefixes (``h:`` + value, ``h#`` + digest): a short value that
spells another client's digest is still a different key.

A value is counted and digested as the bytes the client sent. The proxy port's parser
hands header values over as latin-1 text (one character a byte: the *wire form*);
aiohttp (the WebSocket upgrade path) and the admin query decode them as UTF-8, and
:func:`wire_form` turns those into the same text, so a client's WebSocket upgrade and
its plain requests spend one budget, and ``/admin/explain`` shows the key they spend.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Literal

__all__ = [
    "CREDENTIAL_FIELDS",
    "MAX_VALUE_BYTES",
    "credential_form",
    "digest",
    "policy_key",
    "value_key",
    "wire_form",
]

MAX_VALUE_BYTES = 64
"""Key values longer than this (bytes as sent) are replaced by their digest."""

KeyKind = Literal["ip", "route", "ip_route", "header"]

CREDENTIAL_FIELDS = frozenset(("authorization", "proxy-authorization"))
"""Fields read as ``scheme credentials`` (:func:`credential_form`)."""


def wire_form(value: str) -> str:
    """The wire form of a value decoded as UTF-8 (undecodable bytes as lone surrogates,
    as aiohttp leaves them): the latin-1 text of its bytes."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("latin-1")


def _wire_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # not in wire form: its UTF-8 bytes, never an error
        return value.encode("utf-8", "surrogatepass")


def digest(value: str) -> str:
    """SHA-256 of the whole value's bytes, unpadded base64url (43 characters)."""
    raw = hashlib.sha256(_wire_bytes(value)).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def value_key(tag: str, value: str) -> str:
    """``tag:value`` for a value (wire form) of at most MAX_VALUE_BYTES bytes, else
    ``tag#digest``."""
    if len(value) <= MAX_VALUE_BYTES:
        return tag + ":" + value
    return tag + "#" + digest(value)


def credential_form(value: str) -> str:
    """An ``Authorization`` value as its server reads it: the scheme is case-insensitive
    and one or more spaces part it from the credentials (RFC 9110 11.4, 11.6.2), so
    ``bearer  T`` is ``Bearer T``: a client must not gain a budget per spelling. A tab
    counts as a space: servers split the value on any whitespace (``str.split()``)."""
    if "\t" in value:
        value = value.replace("\t", " ")
    scheme, sep, rest = value.partition(" ")
    if not sep:
        return value
    return scheme.lower() + " " + rest.lstrip(" ")


def policy_key(
    kind: KeyKind | str, client_key: str, route: str, header: str | None, value: str | None
) -> str:
    """The budget a request spends under a policy keyed by ``kind``.

    ``client_key`` is the client address's key (IPv6: its prefix), ``route`` the matched
    route's name, ``value`` the value of the policy's ``header`` field in wire form (None
    or empty: absent, and the client is then keyed by its address).
    """
    if kind == "ip":
        return client_key
    if kind == "route":
        return "route:" + route
    if kind == "ip_route":
        return client_key + "|" + route
    if value:
        if header is not None and header.lower() in CREDENTIAL_FIELDS:
            value = credential_form(value)
        return value_key("h", value)
    return client_key
