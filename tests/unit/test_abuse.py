"""The pure abuse rules: path matching, the sliding score, ban escalation."""

from __future__ import annotations

import pytest

from gateway.config import Abuse
from gateway.core.abuse import (
    EVENTS,
    OFFENCE_MEMORY_FACTOR,
    PathMatcher,
    ScoreState,
    add_event,
    ban_duration,
    is_stale,
    offences_forget_at,
    score_at,
)

DEFAULT_PATHS = Abuse().suspicious_paths
T0 = 1_700_000_000.0


def test_events_are_the_configurable_scores() -> None:
    assert set(EVENTS) == set(Abuse().scores.model_dump())


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/.env", True),
        ("/.env.bak", False),  # exact entry: no prefix match
        ("/.env/", False),
        ("/.git/", True),
        ("/.git/config", True),  # entry ending in "/": prefix match
        ("/.git/objects/ab/cdef", True),
        ("/.git", False),
        ("/.github/workflows", False),
        ("/wp-admin", True),
        ("/wp-admin/", False),  # "/wp-admin" is exact only
        ("/wp-admin/install.php", False),
        ("/wp-admins", False),
        ("/wp-login.php", True),
        ("/phpmyadmin", True),
        ("/PHPMYADMIN", False),  # the caller lowers the path (the pipeline does)
        ("/phpMyAdmin", False),
        ("/", False),
        ("", False),
        ("/api/.env", False),  # only from the root
        ("/static/app.js", False),
    ],
)
def test_path_matcher_defaults(path: str, expected: bool) -> None:
    assert PathMatcher(DEFAULT_PATHS).matches(path) is expected


@pytest.mark.parametrize(
    ("paths", "path", "expected"),
    [
        ((), "/.env", False),
        (("/wp-admin", "/wp-admin/"), "/wp-admin/x", True),
        (("/wp-admin", "/wp-admin/"), "/wp-admin", True),
        (("/a/", "/b/"), "/b/c", True),
        (("/a/", "/b/"), "/c/a/", False),
        (("/",), "/anything", True),
        (("/x/", "/x/"), "/x/y", True),  # duplicates are harmless
        (("/.ENV", "/WP-Admin/"), "/.env", True),  # entries are lowered ...
        (("/.ENV", "/WP-Admin/"), "/wp-admin/x", True),
        (("/.env",), "/.ENV", False),  # ... the caller lowers the path
    ],
)
def test_path_matcher_lists(paths: tuple[str, ...], path: str, expected: bool) -> None:
    assert PathMatcher(paths).matches(path) is expected


@pytest.mark.parametrize("bad", ["", ".env", "wp-admin/", "*"])
def test_path_matcher_rejects_entries_not_starting_with_slash(bad: str) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        PathMatcher(["/ok", bad])


# (seconds after T0, points added or None to only read, expected score); window 60 s
SCORE_TABLE: list[tuple[str, list[tuple[float, float | None, float]]]] = [
    ("points add up within a bucket", [(0, 1, 1), (10, 3, 4), (59, 25, 29)]),
    (
        "the previous bucket fades linearly",
        [(0, 30, 30), (30, None, 30), (60, None, 30), (90, None, 15), (105, None, 7.5)],
    ),
    ("points older than two windows are gone", [(0, 30, 30), (119.9, None, 0.05), (120, None, 0)]),
    ("a long pause starts a fresh window", [(0, 10, 10), (500, 2, 2), (530, None, 2)]),
    (
        "steady 1 point a second settles at the window total",
        [(t, 1, t + 1 if t < 60 else 61) for t in range(180)],
    ),
    ("previous share plus current points", [(0, 40, 40), (75, 5, 35.0)]),
    ("a clock going back stays in the bucket", [(0, 10, 10), (-5, 1, 11)]),
]


@pytest.mark.parametrize(("steps"), [s for _, s in SCORE_TABLE], ids=[n for n, _ in SCORE_TABLE])
def test_score_table(steps: list[tuple[float, float | None, float]]) -> None:
    state = ScoreState()
    for at, points, expected in steps:
        now = T0 + at
        if points is None:
            got = score_at(state, now, 60)
        else:
            got = add_event(state, points, now, 60)
            assert score_at(state, now, 60) == pytest.approx(got)
        assert got == pytest.approx(expected, abs=1e-6), (at, points)


def test_reading_a_score_changes_nothing() -> None:
    state = ScoreState()
    add_event(state, 30, T0, 60)
    before = (state.start, state.current, state.previous)
    assert score_at(state, T0 + 90, 60) == pytest.approx(15)
    assert (state.start, state.current, state.previous) == before


def test_first_bucket_starts_at_first_event() -> None:
    state = ScoreState()
    add_event(state, 1, T0 + 17.5, 60)
    assert state.start == T0 + 17.5


@pytest.mark.parametrize(
    ("offset", "points", "stale"),
    [(0, 0, True), (0, 5, False), (119, 5, False), (120, 5, True), (1000, 5, True)],
)
def test_is_stale(offset: float, points: float, stale: bool) -> None:
    state = ScoreState()
    if points:
        add_event(state, points, T0, 60)
    assert is_stale(state, T0 + offset, 60) is stale


@pytest.mark.parametrize(
    ("offences", "ban_s", "multiplier", "max_ban_s", "expected"),
    [
        (1, 600, 2, 86400, 600),
        (2, 600, 2, 86400, 1200),
        (3, 600, 2, 86400, 2400),
        (4, 600, 2, 86400, 4800),
        (7, 600, 2, 86400, 38400),
        (8, 600, 2, 86400, 76800),
        (9, 600, 2, 86400, 86400),  # 153600 capped
        (50, 600, 2, 86400, 86400),
        (100_000, 600, 2, 86400, 86400),  # no overflow
        (5, 600, 1, 86400, 600),  # multiplier 1: no escalation
        (3, 10, 1.5, 1000, 22.5),
        (1, 5000, 2, 3600, 3600),  # ban_s above the cap is capped too
        (3, 600, 2, 1500, 1500),
    ],
)
def test_ban_duration(
    offences: int, ban_s: float, multiplier: float, max_ban_s: float, expected: float
) -> None:
    assert ban_duration(offences, ban_s, multiplier, max_ban_s) == pytest.approx(expected)


def test_ban_duration_counts_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        ban_duration(0, 600, 2, 86400)


def test_offences_are_forgotten_two_max_bans_after_expiry() -> None:
    assert OFFENCE_MEMORY_FACTOR == 2
    assert offences_forget_at(T0 + 600, 86400) == T0 + 600 + 2 * 86400
