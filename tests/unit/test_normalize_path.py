"""Route matching on a normalised path: dot segments removed, empty segments merged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline.snapshot import normalize_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/", "/"),
        ("/a/b/", "/a/b/"),
        ("//admin/users", "/admin/users"),
        ("/x/../admin/users", "/admin/users"),
        ("/admin/./users", "/admin/users"),
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/../../etc", "/etc"),
        ("/a//b//", "/a/b/"),
        ("/.env", "/.env"),
        ("/..a/b", "/..a/b"),
        ("/a/.../b", "/a/.../b"),
    ],
)
def test_normalize_path(path: str, expected: str) -> None:
    assert normalize_path(path) == expected


@given(st.lists(st.sampled_from(["", ".", "..", "a", "b", "..a", "%2e"]), max_size=8))
def test_normalised_paths_hold_no_dot_or_empty_segment(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    out = normalize_path(path)
    assert out.startswith("/")
    inner = out.split("/")[1:-1]
    assert all(seg not in ("", ".", "..") for seg in inner), out
    assert out.split("/")[-1] not in (".", "..")
    assert normalize_path(out) == out  # idempotent
