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
    lines = filter_header_lines(FIELDS, DROP, underscores)
    assert [line.split(":", 1)[0] for line in lines] == kept
