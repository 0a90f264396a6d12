"""The canonical path (SPEC 9): one reading of a target for every decision.

Each row is a spelling a client can send and what the gateway's routes, guards and
suspicious-path scoring read it as; ``None`` means the request is refused (400).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.paths import PathError, canonical_path, reads_as_authority

ROWS = [
    # already canonical: returned as it is
    ("/", "/"),
    ("/a/b/", "/a/b/"),
    ("/api/v1.2/items", "/api/v1.2/items"),
    ("/a|{}^`", "/a|{}^`"),
    ("/a b", "/a b"),  # a raw space (an explain path) is kept inside a segment ...
    ("/a /b ", "/a/b"),  # ... and dropped at its end
    ("/..a/b", "/..a/b"),
    # doubled slashes and dot segments
    ("//admin/users", "/admin/users"),
    ("/x/../admin/users", "/admin/users"),
    ("/admin/./users", "/admin/users"),
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/a//b//", "/a/b/"),
    ("/../../etc", "/etc"),  # above the root stays at the root
    ("//.env", "/.env"),
    ("/./.env", "/.env"),
    ("/x/../.env", "/.env"),
    ("//.git/config", "/.git/config"),
    # ; path parameters, as Tomcat and Spring read them
    ("/x/..;/admin/x", "/admin/x"),
    ("/admin;x=1/x", "/admin/x"),
    ("/x/..;jsessionid=1/admin", "/admin"),
    ("/x/.;/admin", "/x/admin"),
    ("/admin/;x", "/admin/"),
    # an encoded ; is a delimiter too: Spring's firewall refuses %3B because containers
    # disagree on whether they decode it before they cut path parameters
    ("/a%3bb;c/d", "/a/d"),
    ("/admin%3Bx=1/x", "/admin/x"),
    ("/x/..%3b/admin", "/admin"),
    ("/x/%2e%2e%3B/admin", "/admin"),
    ("/x/%253b/admin", None),
    # backslashes, raw and encoded
    ("/x/..\\admin/x", "/admin/x"),
    ("\\admin", None),  # not a path (it does not start with /)
    ("/\\admin\\x", "/admin/x"),
    ("/x/..%5cadmin/x", "/admin/x"),
    ("/x/..%5Cadmin/x", "/admin/x"),
    # encoded dots and slashes, in any letter case, decoded once
    ("/x/%2e%2e/admin", "/admin"),
    ("/x/%2E%2e/admin", "/admin"),
    ("/x/.%2E/admin", "/admin"),
    ("/x%2F..%2Fadmin/users", "/admin/users"),
    ("/x%2f..%2fadmin", "/admin"),
    ("/%2e/.env", "/.env"),
    ("/%2Eenv", "/.env"),
    # unreserved characters decoded, others kept with upper-case hex
    ("/%61dmin/x", "/admin/x"),
    ("/%41%7e%2D%5f", "/A~-_"),
    ("/a%20b", "/a%20b"),
    ("/a%3fb", "/a%3Fb"),
    ("/%e2%82%ac", "/%E2%82%AC"),
    ("/caf\u00e9", "/caf%C3%A9"),  # raw non-ASCII (an explain path): encoded as UTF-8
    # double encoding: refused, a component decoding twice would read another path
    ("/x/%252e%252e/admin", None),
    ("/x/%252fadmin", None),
    ("/x/%255cadmin", None),
    ("/x/%25%32%65%25%32%65/admin", None),
    ("/a%2500", None),
    ("/a%2525", None),
    ("/a%2541", "/a%2541"),  # a literal "%A": harmless decoded twice
    # invalid percent-encodings and controls
    ("/a%zz", None),
    ("/a%", None),
    ("/a%4", None),
    ("/a%g1", None),
    ("/a%u002e", None),  # IIS %u encoding
    ("/a%00", None),
    ("/.env%00.txt", None),
    ("/a%0d%0aX:1", None),
    ("/a%7f", None),
    ("/a\x00b", None),
    ("/a\tb", None),
    # overlong UTF-8 and compatibility folding
    ("/x/%c0%ae%c0%ae/admin", None),
    ("/a%c0%afb", None),
    ("/a%e0%80%aeb", None),
    ("/a%ffb", None),
    ("/x/%ef%bc%8e%ef%bc%8e/admin", None),  # full-width full stops
    ("/x/%ef%bc%8fadmin", None),  # full-width solidus
    ("/x/%e2%80%a5/admin", None),  # two dot leader
    ("/\ufe52\ufe52/admin", None),
    # a character that folds (NFKC) or changes case into ASCII spells a letter, a space
    # or a separator for an upstream that folds: a full-width a makes /admin
    ("/%ef%bd%81dmin/x", None),  # full-width a
    ("/\uff41dmin/x", None),
    ("/admin%c2%a0/x", None),  # no-break space
    ("/admin%e3%80%80/x", None),  # ideographic space
    ("/ad%c4%b1min", None),  # dotless i: upper() is I
    ("/%e2%84%aaey", None),  # Kelvin sign: lower() is k
    ("/%c4%b0ndex", None),  # dotted capital I: lower() is i and a combining dot
    ("/%c5%bfecret", None),  # long s: NFKC is s
    ("/%ef%ac%81le", None),  # the fi ligature
    ("/stra%c3%9fe", "/stra%C3%9Fe"),  # ß upper-cases to two letters: not one letter
    ("/%c3%a9t%c3%a9", "/%C3%A9t%C3%A9"),
    # trailing dots (Windows drops them)
    ("/admin./x", "/admin/x"),
    ("/.env.", "/.env"),
    ("/wp-admin...", "/wp-admin"),
    ("/a/.../b", "/a/b"),
    # trailing spaces (Windows drops them too)
    ("/admin%20/x", "/admin/x"),
    ("/.env%20", "/.env"),
    ("/.env%20.%20", "/.env"),
    ("/x/..%20/admin", "/admin"),
    ("/a%20b/", "/a%20b/"),
    ("/%20/x", "/x"),
    # query strings and fragments
    ("/a?x=/../b", "/a"),
    ("/x?/../admin", "/x"),
    ("/admin?", "/admin"),
    ("/a?x#y", "/a"),
    ("/a#frag", None),
    ("/x#/../admin", None),
    ("/x%23y", "/x%23y"),
    # letter case is kept (matching lowers it)
    ("/.ENV", "/.ENV"),
    ("/WP-ADMIN/./", "/WP-ADMIN/"),
    # not a path
    ("", None),
    ("*", None),
    ("admin", None),
]


@pytest.mark.parametrize(("target", "expected"), ROWS)
def test_canonical_path(target: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(PathError):
            canonical_path(target)
    else:
        assert canonical_path(target) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("//h/admin", True),
        ("///admin", True),
        ("/\\h/admin", True),
        ("//", True),
        ("/", False),
        ("/a//b", False),
        ("/%2F/h", False),  # URL parsers do not decode before they look for a host
        ("/.//h", False),
    ],
)
def test_a_target_that_reads_as_an_authority(target: str, expected: bool) -> None:
    assert reads_as_authority(target) is expected


def test_the_table_covers_at_least_forty_spellings() -> None:
    assert len({t for t, _ in ROWS}) == len(ROWS) >= 40


_SEGMENTS = ["", ".", "..", "a", "B", "..a", "%2e", "%2E%2e", "x;p=1", "..;", "\\", "%5c",
             "%2f", "a.", "%41", "%20", "%zz", "%00", "%252e", "%c3%a9", "~"]  # fmt: skip


@given(st.lists(st.sampled_from(_SEGMENTS), max_size=8))
def test_a_canonical_path_is_a_fixed_point_without_dot_or_empty_segments(
    segments: list[str],
) -> None:
    try:
        out = canonical_path("/" + "/".join(segments))
    except PathError:
        return
    assert out.startswith("/")
    inner = out.split("/")[1:-1]
    assert all(seg and not seg.endswith(".") for seg in inner), out
    assert out.split("/")[-1] not in (".", "..")
    assert not any(c in out for c in ";\\?#"), out
    assert canonical_path(out) == out


@given(st.text(max_size=40))
def test_any_text_is_a_path_or_bad_path(text: str) -> None:
    try:
        out = canonical_path("/" + text)
    except PathError:
        return
    assert canonical_path(out) == out
