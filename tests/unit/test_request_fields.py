"""The request fields passed upstream: field names with "_" under each setting (SPEC 9)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.upstream.hop_by_hop import DROP_UPSTREAM, HOP_BY_HOP, filter_header_lines

DROP = DROP_UPSTREAM | HOP_BY_HOP | {"x-request-id"}
FIELDS = CIMultiDict(
    [
        ("Accept", "*/*"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("x-forwarded_for", "6.6.6.7"),
        ("X_REAL_IP", "6.6.6.8"),
        ("X_Request_Id", "forged"),
        ("Transfer_Encoding", "chunked"),
        ("X_Custom", "1"),
        ("X-Forwarded-For", "6.6.6.9"),
    ]
)


@pytest.mark.parametrize(
    ("underscores", "kept"),
    [
        (None, ["Accept", "X_Forwarded_For", "x-forwarded_for", "X_REAL_IP", "X_Request_Id",
                "Transfer_Encoding", "X_Custom"]),
        ("drop", ["Accept"]),
        ("allow", ["Accept", "X_Custom"]),
    ],
)  # fmt: skip
def test_underscored_names_upstream(underscores: str | None, kept: list[str]) -> None:
    lines = "".join(filter_header_lines(list(FIELDS.items()), DROP, underscores))
    assert [line.split(":", 1)[0] for line in lines.split("\r\n") if line] == kept


def test_fields_named_by_connection_are_dropped_wherever_they_stand() -> None:
    fields = [
        ("X-Before", "1"),
        ("Accept", "*/*"),
        ("Connection", "x-before, X-After"),
        ("Connection", "content-length"),  # framing: never dropped for being listed
        ("Content-Length", "3"),
        ("X-After", "2"),
        ("Keep-Alive", "timeout=5"),
    ]
    for underscores in (None, "drop", "allow"):
        lines = "".join(filter_header_lines(fields, DROP, underscores))
        assert lines == "Accept: */*\r\nContent-Length: 3\r\n"


def test_fields_pass_in_order_without_connection() -> None:
    fields = [("B", "2"), ("Host", "h"), ("A", "1"), ("b", "3"), ("TE", "trailers")]
    assert "".join(filter_header_lines(fields, DROP)) == "B: 2\r\nA: 1\r\nb: 3\r\n"
