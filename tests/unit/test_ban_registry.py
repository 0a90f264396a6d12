"""Merging the shared ban list's answers into a replica's view, and replica division: no Redis."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.core.gcra import Rate
from gateway.stores.bans import Ban
from gateway.stores.redis.ban_registry import merge, records
from gateway.stores.redis.replicas import Replicas


def ban(ip: str, until: float = 2000.0) -> Ban:
    return Ban(ip, "score", 30.0, until, 1, 1000.0)


def record(b: Ban) -> bytes:
    fields = ("reason", "score", "expires_at", "offences", "banned_at")
    return orjson.dumps({f: getattr(b, f) for f in fields})


def test_records_decode_bytes_and_mark_removed_or_broken_ones() -> None:
    items: list[Any] = [b"192.0.2.1", record(ban("192.0.2.1")), b"192.0.2.2", b"", "192.0.2.3", "{"]
    assert list(records(items)) == [
        ("192.0.2.1", ban("192.0.2.1")),
        ("192.0.2.2", None),
        ("192.0.2.3", None),
    ]


def test_a_full_answer_replaces_the_view_and_names_the_new_bans() -> None:
    view = {"192.0.2.1": ban("192.0.2.1"), "192.0.2.9": ban("192.0.2.9")}
    items = ["192.0.2.1", record(ban("192.0.2.1")), "192.0.2.2", record(ban("192.0.2.2"))]
    merged, fresh = merge(view, {}, "full", 5, items)
    assert merged == {"192.0.2.1": ban("192.0.2.1"), "192.0.2.2": ban("192.0.2.2")}
    assert fresh == ["192.0.2.2"]


def test_a_delta_changes_the_view_in_place() -> None:
    view = {"192.0.2.1": ban("192.0.2.1")}
    merged, fresh = merge(
        view, {}, "delta", 5, ["192.0.2.1", "", "192.0.2.2", record(ban("192.0.2.2"))]
    )
    assert merged is view
    assert merged == {"192.0.2.2": ban("192.0.2.2")}
    assert fresh == ["192.0.2.2"]


@pytest.mark.parametrize(
    ("change", "mine", "expected", "kept"),
    [
        (4, None, {"192.0.2.1": ban("192.0.2.1")}, False),  # the answer already has my unban
        (6, None, {}, True),  # my unban came after the answer: it wins
        (6, ban("192.0.2.1", 3000.0), {"192.0.2.1": ban("192.0.2.1", 3000.0)}, True),
        (0, None, {"192.0.2.1": ban("192.0.2.1")}, False),  # no change was made
    ],
)
def test_own_changes_later_than_the_answer_are_kept_over_it(
    change: int, mine: Ban | None, expected: dict[str, Ban], kept: bool
) -> None:
    own: dict[str, tuple[int, Ban | None]] = {"192.0.2.1": (change, mine)}
    merged, _ = merge({}, own, "full", 5, ["192.0.2.1", record(ban("192.0.2.1"))])
    assert merged == expected
    assert ("192.0.2.1" in own) is kept


@pytest.mark.parametrize(
    ("count", "rate", "expected"),
    [
        (1, Rate(10, 1.0, 20), Rate(10, 1.0, 20)),
        (2, Rate(10, 1.0, 20), Rate(10, 2.0, 10)),
        (3, Rate(10, 1.0, 20), Rate(10, 3.0, 7)),  # burst rounded up: never 0
    ],
)
def test_the_local_fallback_divides_rates_by_the_live_replicas(
    count: int, rate: Rate, expected: Rate
) -> None:
    replicas = Replicas(None, key="gw:replicas", replica_id="a", ttl_s=15.0, timeout_s=0.25)
    replicas._count = count  # as an announcement would have counted them
    assert replicas.divide(rate) == expected
    assert replicas.divide_all({"p": rate}) == {"p": expected}
