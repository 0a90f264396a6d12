"""Client keys: never truncated, digested past 64 bytes, one function for everyone."""

from __future__ import annotations

import base64
import hashlib

import pytest

from gateway.core.keys import (
    MAX_VALUE_BYTES,
    credential_form,
    digest,
    policy_key,
    value_key,
    wire_form,
)
from gateway.stores.limiter import MAX_KEY_CHARS, bounded_key


def _sha(value: str) -> str:
    raw = hashlib.sha256(value.encode()).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


E_ACUTE = "\u00e9"  # 2 bytes in UTF-8
EURO = "\u20ac"  # 3 bytes
EMOJI = "\U0001f600"  # 4 bytes


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("", True),
        ("a", True),
        ("a" * 63, True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("a" * 62 + E_ACUTE, True),  # 64 bytes, 63 characters
        ("a" * 63 + E_ACUTE, False),  # 65 bytes, 64 characters
        ("a" * 61 + EURO, True),  # 64 bytes
        ("a" * 62 + EURO, False),  # 65 bytes, 63 characters
        (EMOJI * 16, True),  # 64 bytes, 16 characters
        (EMOJI * 16 + "a", False),  # 65 bytes, 17 characters
        (EURO * 21 + "a", True),  # 64 bytes, 22 characters
        (EURO * 21 + "ab", False),  # 65 bytes, 23 characters
        (E_ACUTE * 32, True),  # 64 bytes
        (E_ACUTE * 33, False),  # 66 bytes, 33 characters
        ("x" * 10_000, False),
    ],
)
def test_a_value_is_kept_up_to_64_bytes_else_digested(value: str, kept: bool) -> None:
    """Counted in the bytes the client sent (UTF-8 here), not in characters."""
    key = value_key("h", wire_form(value))
    if kept:
        assert key == "h:" + wire_form(value)
    else:
        assert key == "h#" + _sha(value)
        assert len(key) == 45
    assert (len(value.encode()) <= MAX_VALUE_BYTES) == kept


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("a" * 256 + "1", "a" * 256 + "2"),  # the old 256-character cut made these one
        ("t" * 300, "t" * 301),
        ("a" * 64, "a" * 65),
        ("a" * 65, "a" * 66),
        ("a" * 63 + E_ACUTE, "a" * 63 + "e"),
        (EMOJI * 16 + "a", EMOJI * 16 + "b"),
        ("h#" + _sha("x" * 100), "x" * 100),  # a short value spelling another's digest
        (_sha("x" * 100), "x" * 100),
    ],
)
def test_distinct_values_are_distinct_keys(a: str, b: str) -> None:
    ka, kb = value_key("h", wire_form(a)), value_key("h", wire_form(b))
    assert ka != kb
    assert bounded_key(ka) != bounded_key(kb)


@pytest.mark.parametrize(
    ("utf8", "latin1"),
    [
        ("abc", "abc"),
        (E_ACUTE, "\xc3\xa9"),
        (EMOJI, "\xf0\x9f\x98\x80"),
        ("a\udcff", "a\xff"),  # a byte that is no UTF-8, as aiohttp leaves it
    ],
)
def test_the_wire_form_is_the_same_text_whichever_parser_decoded_it(utf8: str, latin1: str) -> None:
    """aiohttp (WebSocket upgrades, the admin query) decodes field values as UTF-8, the
    proxy port's parser as latin-1: both give one key for the same bytes."""
    assert wire_form(utf8) == latin1
    assert value_key("h", wire_form(utf8 * 40)) == value_key("h", latin1 * 40)


def test_the_digest_is_sha256_base64url_of_the_whole_value() -> None:
    value = "Bearer " + "eyJ" * 200
    assert digest(value) == _sha(value)
    assert digest(wire_form(EURO * 30)) == _sha(EURO * 30)
    assert value_key("h", value) == value_key("h", value)  # deterministic


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("ip", "tok", "203.0.113.7"),
        ("route", "tok", "route:api"),
        ("ip_route", "tok", "203.0.113.7|api"),
        ("header", "tok", "h:tok"),
        ("header", None, "203.0.113.7"),  # no value: keyed by the address
        ("header", "", "203.0.113.7"),
        ("header", "v" * 65, "h#" + _sha("v" * 65)),
    ],
)
def test_policy_key(kind: str, value: str | None, expected: str) -> None:
    assert policy_key(kind, "203.0.113.7", "api", "X-Api-Key", value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer abc", "bearer abc"),
        ("BEARER abc", "bearer abc"),
        ("bEaReR   abc", "bearer abc"),
        ("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==", "basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ("Bearer AbC", "bearer AbC"),  # credentials keep their case
        ("token-without-scheme", "token-without-scheme"),
        ("Digest a=1, b=2", "digest a=1, b=2"),
        ("Bearer\tabc", "bearer abc"),  # a tab parts them too (servers split on whitespace)
        ("bearer \t \tabc", "bearer abc"),
        ("Bearer\tabc def", "bearer abc def"),
    ],
)
def test_credential_form(value: str, expected: str) -> None:
    assert credential_form(value) == expected


@pytest.mark.parametrize("header", ["Authorization", "authorization", "Proxy-Authorization"])
def test_a_credential_field_is_keyed_as_its_server_reads_it(header: str) -> None:
    keys = {
        policy_key("header", "ip", "api", header, v)
        for v in ("Bearer tok", "bearer tok", "BEARER  tok")
    }
    assert keys == {"h:bearer tok"}
    long = {
        policy_key("header", "ip", "api", header, v + "t" * 100) for v in ("Bearer ", "bearer   ")
    }
    assert len(long) == 1


def test_other_fields_are_opaque() -> None:
    assert policy_key("header", "ip", "api", "X-Api-Key", "Bearer tok") == "h:Bearer tok"
    assert policy_key("header", "ip", "api", "X-Api-Key", "bearer tok") == "h:bearer tok"


@pytest.mark.parametrize(
    "key",
    [
        "h:" + "a" * 64,
        "h:" + wire_form(EMOJI * 16),
        "2001:db8:1:2::/64|" + "r" * 63,  # the longest ip_route key
        "route:" + "r" * 63,
        "h#" + _sha("x"),
    ],
)
def test_the_stores_keep_every_pipeline_key_as_it_is(key: str) -> None:
    assert len(key) <= MAX_KEY_CHARS
    assert bounded_key(key) == key


def test_the_stores_digest_an_overlong_key_whole() -> None:
    a, b = "k" * 1000 + "1", "k" * 1000 + "2"
    assert bounded_key(a) == "#" + _sha(a)
    assert bounded_key(a) != bounded_key(b)
