"""API-key files and JSON-body keys: parsing, look-up, the pointer's rules."""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.identity.api_keys import ApiKeyError, ApiKeys
from gateway.identity.body import MAX_BODY, JsonPointer, is_json_media_type


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS = f"""
keys:
  - {{id: team-a, sha256: {_sha("key-a")}, plan: pro}}
  - {{id: team-b, sha256: "{_sha("key-b").upper()}"}}
"""


def test_a_listed_key_is_found_by_its_digest() -> None:
    keys = ApiKeys.from_text(KEYS)
    assert len(keys) == 2
    a = keys.lookup("key-a")
    assert a is not None
    assert (a.id, a.plan) == ("team-a", "pro")
    b = keys.lookup("key-b")
    assert b is not None
    assert (b.id, b.plan) == ("team-b", None)


@pytest.mark.parametrize("raw", ["", "key-c", "KEY-A", "key-a ", _sha("key-a"), "\udcff"])
def test_other_keys_are_not_found(raw: str) -> None:
    assert ApiKeys.from_text(KEYS).lookup(raw) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: [", "not YAML"),
        ("[]", "'keys' list"),
        ("keys: {}", "'keys' list"),
        ("keys: []\nextra: 1", "extra: unknown field"),
        ("keys: [1]", r"keys\[0\]: expected a mapping"),
        (f"keys: [{{sha256: {_sha('x')}}}]", r"keys\[0\].id:"),
        ("keys: [{id: a, sha256: abc}]", r"keys\[0\].sha256: 64 hex digits"),
        ("keys: [{id: a, sha256: " + "g" * 64 + "}]", r"keys\[0\].sha256"),
        (f"keys: [{{id: 'a b', sha256: {_sha('x')}}}]", r"keys\[0\].id"),
        (f"keys: [{{id: a, sha256: {_sha('x')}, plan: ''}}]", r"keys\[0\].plan"),
        (f"keys: [{{id: a, sha256: {_sha('x')}, key: x}}]", r"keys\[0\].key: unknown field"),
        (
            f"keys: [{{id: a, sha256: {_sha('x')}}}, {{id: a, sha256: {_sha('y')}}}]",
            r"keys\[1\].id: 'a' is listed twice",
        ),
        (
            f"keys: [{{id: a, sha256: {_sha('x')}}}, {{id: b, sha256: {_sha('x')}}}]",
            r"keys\[1\].sha256: the same key is listed twice",
        ),
    ],
)
def test_bad_key_files_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ApiKeyError, match=message):
        ApiKeys.from_text(text)


@pytest.mark.parametrize(
    ("pointer", "body", "key"),
    [
        ("/message/chat/id", b'{"message": {"chat": {"id": 123}}}', "123"),
        ("/message/chat/id", b'{"message": {"chat": {"id": "123"}}}', '"123"'),
        ("/message/chat/id", b'{"message": {"chat": {"id": -100123}}}', "-100123"),
        ("/a", b'{"a": {"y": 1, "x": 2}}', '{"x":2,"y":1}'),  # one text for one value
        ("/a", b'{"a": null}', "null"),
        ("/a", b'{"a": true}', "true"),
        ("/a/1", b'{"a": [10, 20]}', "20"),
        ("/a/0", b'{"a": [10, 20]}', "10"),
        ("/a~1b", b'{"a/b": 1}', "1"),
        ("/a~0b", b'{"a~b": 2}', "2"),
        ("/", b'{"": 3}', "3"),
        ("", b"[1]", "[1]"),
        # No key: the fallback applies.
        ("/a/2", b'{"a": [10, 20]}', None),
        ("/a/01", b'{"a": [10, 20]}', None),
        ("/a/-", b'{"a": [10, 20]}', None),
        ("/a/x", b'{"a": [10, 20]}', None),
        ("/a/b", b'{"a": 1}', None),
        ("/missing", b'{"a": 1}', None),
        ("/a", b"not json", None),
        ("/a", b'{"a": 1', None),
        ("/a", b"", None),
        ("/a", b'{"a": 1e400}', None),  # past a double: not JSON to orjson
        ("/a", b'{"a": 1}' + b" " * MAX_BODY, None),  # over the size read
    ],
)
def test_json_pointer_keys(pointer: str, body: bytes, key: str | None) -> None:
    assert JsonPointer(pointer).key(body) == key


@pytest.mark.parametrize("pointer", ["a/b", "/a~2", "/a~", "#/a"])
def test_bad_pointers_are_refused(pointer: str) -> None:
    with pytest.raises(ValueError, match="JSON pointer"):
        JsonPointer(pointer)


@pytest.mark.parametrize(
    ("content_type", "json"),
    [
        ("application/json", True),
        ("Application/JSON; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("application/merge-patch+json", True),
        ("text/json", False),
        ("application/jsonp", False),
        ("application/+json", False),
        ("application/x-www-form-urlencoded", False),
        ("json", False),
        ("", False),
        (None, False),
    ],
)
def test_json_media_types(content_type: str | None, json: bool) -> None:
    assert is_json_media_type(content_type) is json


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # integers past 64 bits are parsed as floats by a fast parser: still two chats
        (b"123456789012345678901", b"123456789012345678902"),
        (b"18446744073709551616", b"18446744073709551617"),
        (b"-9223372036854775809", b"-9223372036854775810"),
        (b"1" * 300, b"1" * 299 + b"2"),
        # numbers a float cannot tell apart are two keys too
        (b"0.1", b"0.10000000000000001"),
        (b"1e-400", b"2e-400"),
        (b"1e-400", b"0"),
        (b"123456789012345678901.0", b"123456789012345678902.0"),
        # an integer and a fraction of the same value stay two keys
        (b"123456789012345678901", b"123456789012345678901.0"),
        (b"100", b"1e2"),
    ],
)
def test_different_numbers_are_different_keys(first: bytes, second: bytes) -> None:
    pointer = JsonPointer("/chat/id")
    a = pointer.key(b'{"chat": {"id": ' + first + b"}}")
    b = pointer.key(b'{"chat": {"id": ' + second + b"}}")
    assert a is not None
    assert b is not None
    assert a != b
    # inside an object too
    whole = JsonPointer("/chat")
    assert whole.key(b'{"chat": {"id": ' + first + b"}}") != whole.key(
        b'{"chat": {"id": ' + second + b"}}"
    )


@pytest.mark.parametrize(
    ("literal", "key"),
    [
        (b"123", "123"),
        (b"-0", "0"),
        (b"123456789012345678901", "123456789012345678901"),
        (b"-123456789012345678901", "-123456789012345678901"),
        # a fraction: the shortest text of its float when that is its exact value ...
        (b"1e2", "100.0"),
        (b"100.0", "100.0"),
        (b"1.23e2", "123.0"),
        (b"0.1", "0.1"),
        (b"-0.0", "0.0"),
        (b"0e5", "0.0"),
        # ... else its exact value in scientific notation
        (b"0.10000000000000001", "1.0000000000000001e-1"),
        (b"123456789012345678901.0", "1.23456789012345678901e20"),
        (b"12345678901234567890100e-2", "1.23456789012345678901e20"),
        (b"1e-400", "1e-400"),
        (b"-25E-401", "-2.5e-400"),
    ],
)
def test_numbers_have_one_exact_text(literal: bytes, key: str) -> None:
    assert JsonPointer("/n").key(b'{"n": ' + literal + b"}") == key
    assert JsonPointer("/n").key(b'{"n": [' + literal + b"]}") == f"[{key}]"


@pytest.mark.parametrize(
    ("pointer", "body"),
    [
        # a member name twice on the pointer's path: no key, whichever one the upstream reads
        ("/message/chat/id", b'{"message": {"chat": {"id": 1}, "chat": {"id": 2}}}'),
        ("/message/chat/id", b'{"message": {"chat": {"id": 1, "id": 2}}}'),
        ("/message/chat/id", b'{"message": {"chat": {"id": 1, "id": 1}}}'),
        ("/message/chat/id", b'{"message": {"chat": {"id": 1}}, "message": {}}'),
        ("/message/chat/id", b'{"message": {"chat": {"id": 1}}, "message": {"chat": {"id": 2}}}'),
        ("/message/chat/id", b'{"message": {"chat": {"id": 1}, "\\u0063hat": {"id": 2}}}'),
        ("/message/chat/id", b'{"message" :{"chat": {"id": 1}}, "message": {"chat": {"id": 2}}}'),
        ("/a/0/b", b'{"a": [{"b": 1, "b": 2}]}'),
        # a colon spelled as an escape makes up for the colons of the dropped member
        ("/m/chat/id", b'{"m": {"chat": {"id": 1}, "chat": {"id": 2}, "t": "\\u003a\\u003a"}}'),
        ("/m/chat/id", b'{"m": {"chat": {"id": 1}, "chat": {"id": 2}, "t": "\\u003A\\u003A"}}'),
        # or inside the value the key is made of
        ("/chat", b'{"chat": {"id": 1, "id": 2}}'),
        ("/chat", b'{"chat": {"x": [{"id": 1, "id": 2}]}}'),
        ("/chat/id", b'{"chat": {"id": 1, "id": 2.5}}'),
    ],
)
def test_a_member_name_twice_on_the_path_is_no_key(pointer: str, body: bytes) -> None:
    assert JsonPointer(pointer).key(body) is None


@pytest.mark.parametrize(
    ("pointer", "body", "key"),
    [
        # a name twice away from the path does not matter
        ("/message/chat/id", b'{"message": {"chat": {"id": 1}, "x": 1, "x": 2}}', "1"),
        ("/message/chat/id", b'{"x": 1, "x": 2, "message": {"chat": {"id": 1}}}', "1"),
        # colons inside strings, spaces before a colon: read exactly
        ("/message/chat/id", b'{"message": {"text": "12:30 http://x", "chat": {"id": 7}}}', "7"),
        ("/message/chat/id", b'{"message" : {"chat" : {"id" : 7.5}}}', "7.5"),
        ("/a", b'{"a": {"b": ":", "c": "\\":"}}', '{"b":":","c":"\\":"}'),
    ],
)
def test_names_twice_elsewhere_and_colons_in_strings(pointer: str, body: bytes, key: str) -> None:
    assert JsonPointer(pointer).key(body) == key


_NUMBERS = st.builds(
    lambda sign, whole, fraction, exponent: f"{sign}{whole}{fraction}{exponent}",
    st.sampled_from(["", "-"]),
    st.sampled_from(["0", "1", "9", "10", "100", "123456789012345678901", "18446744073709551616"]),
    st.sampled_from(["", ".0", ".1", ".10", ".5", ".10000000000000001", ".000001"]),
    st.sampled_from(["", "e0", "e1", "E+2", "e-1", "e-2", "e20", "e-320", "e-400", "e300"]),
)


def _number_key(literal: str, *, slow: bool) -> str | None:
    # a \u003a in a sibling string takes the second parse whatever the value
    sibling = b', "s": "\\u003a"' if slow else b""
    return JsonPointer("/n").key(b'{"n": ' + literal.encode() + sibling + b"}")


@given(_NUMBERS, _NUMBERS)
def test_number_keys_are_equal_exactly_when_the_values_are(first: str, second: str) -> None:
    a, b = _number_key(first, slow=False), _number_key(second, slow=False)
    if a is None or b is None:  # past a double's range: not JSON to orjson, no key
        return
    fraction = ("." in first or "e" in first.lower(), "." in second or "e" in second.lower())
    same = Decimal(first) == Decimal(second) and fraction[0] == fraction[1]
    assert (a == b) is same
    # the second parse gives the same key as the first
    assert _number_key(first, slow=True) == a


@pytest.mark.parametrize(("depth", "found"), [(200, True), (300, False), (1000, False)])
def test_a_value_nested_deeper_than_a_key_is_written_is_no_key(depth: int, *, found: bool) -> None:
    for inner in (b"", b"1.5"):  # the first parse's document, and the second's
        body = b'{"n": ' + b"[" * depth + inner + b"]" * depth + b', "s": "\\u003a"}'
        assert (JsonPointer("/n").key(body) is not None) is found
        assert (JsonPointer("/n").key(body.replace(b"\\u003a", b"")) is not None) is found
