"""Field names decoded once: the same answers as decoding afresh, within a bound."""

from __future__ import annotations

from gateway.core import fieldnames
from gateway.core.fieldnames import LONGEST, MOST, PLACES, NameTable, field_name, lower_name


def test_a_name_is_decoded_as_sent_and_handed_out_once() -> None:
    first = field_name(b"X-Request-Thing")
    again = field_name(bytes(bytearray(b"X-Request-Thing")))  # another bytes object
    assert first == "X-Request-Thing"
    assert again is first
    assert lower_name(first) == "x-request-thing"


def test_latin1_bytes_come_back_as_sent() -> None:
    raw = bytes(range(0x21, 0x7F)) + b"\xe9\xff"
    name = field_name(raw[:LONGEST])
    assert name.encode("latin-1") == raw[:LONGEST]
    assert lower_name(name) == name.lower()


def test_a_long_name_is_decoded_each_time_and_not_remembered() -> None:
    raw = b"X-" + b"a" * LONGEST
    before = len(fieldnames._NAMES)
    name = field_name(raw)
    assert name == raw.decode("latin-1")
    assert len(fieldnames._NAMES) == before
    assert lower_name(name) == name.lower()  # (not remembered: lower-cased as it is)


def test_a_name_never_seen_is_lower_cased_as_it_is() -> None:
    assert lower_name("Not-From-The-Parser") == "not-from-the-parser"


def test_names_a_peer_invents_stay_within_the_bound() -> None:
    for i in range(3 * MOST):
        name = field_name(f"X-Invented-{i}".encode())
        assert name == f"X-Invented-{i}"
        assert lower_name(name) == f"x-invented-{i}"
        assert len(fieldnames._NAMES) <= MOST
        assert len(fieldnames._LOWER) <= MOST
    # what is remembered after a refill still answers alike
    assert lower_name(field_name(b"Content-Type")) == "content-type"


def test_a_table_gives_the_name_at_each_place_as_the_bytes_there_read() -> None:
    table = NameTable()
    heads = [
        [b"Host", b"User-Agent", b"Accept"],
        [b"Host", b"User-Agent", b"Accept"],  # the same order: every name from the table
        [b"Host", b"Accept", b"User-Agent", b"X-New"],  # another order
        [b"host", b"ACCEPT"],  # other spellings at known places
        [bytes([0xE9]) + b"-Latin", b"X-" + b"b" * LONGEST],
    ]
    for head in heads:
        names = [table.name(raw, place) for place, raw in enumerate(head)]
        assert names == [raw.decode("latin-1") for raw in head]
    again = table.name(b"host", 0)
    assert again is table.name(bytes(bytearray(b"host")), 0)


def test_a_table_remembers_a_bounded_number_of_short_names() -> None:
    table = NameTable()
    for place in range(3 * PLACES):
        assert table.name(f"X-Field-{place}".encode(), place) == f"X-Field-{place}"
    long_name = b"X-" + b"c" * (10 * LONGEST)
    assert table.name(long_name, 0) == long_name.decode()
    assert len(table._raw) == len(table._names) == PLACES
    assert all(len(raw) <= LONGEST for raw in table._raw)


def test_lower_name_remembers_within_the_bound() -> None:
    for i in range(3 * MOST):
        assert lower_name(f"From-Elsewhere-{i}") == f"from-elsewhere-{i}"
        assert len(fieldnames._LOWER) <= MOST
