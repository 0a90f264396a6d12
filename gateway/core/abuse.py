"""Abuse scoring and ban escalation: the pure rules, with the clock passed in.

SPEC section 3, ``abuse``.  Each client IP collects points for the events it causes
(:data:`EVENTS`, the points come from ``abuse.scores``).  When its score reaches
``ban_score`` within ``window_s`` it is banned; the ban resets its score.

Sliding window (an approximation, O(1) memory per IP)
    The points are counted in two buckets of ``window_s`` each, the current one and the
    one before it.  The score at time ``now`` is::

        previous * (1 - (now - start) / window_s) + current

    i.e. the points of the current bucket plus the share of the previous bucket that
    still overlaps the window ``(now - window_s, now]``, assuming those points were spread
    evenly over it.  The score equals the exact sliding count when events are evenly
    spread, and never differs from it by more than the points of the previous bucket.
    In particular points reported together count in full at once, and points older than
    ``2 * window_s`` never count.  A fresh IP's first bucket starts at its first event.

Escalation
    A repeat ban of the same IP lasts ``ban_multiplier`` times longer than the one before
    (``ban_s``, ``ban_s * m``, ``ban_s * m**2`` ...), capped at ``max_ban_s``.  Offences
    are remembered until :data:`OFFENCE_MEMORY_FACTOR` ``* max_ban_s`` after the last ban
    expires (with the defaults: two days); after that an IP starts again at ``ban_s``.

Path matching
    :class:`PathMatcher` flags ``suspicious_paths``: an entry matches the path exactly,
    or, when it ends in ``/``, as a prefix.  So ``/.git/`` matches ``/.git/config`` and
    ``/.git/`` (but not ``/.git``), while ``/wp-admin`` matches only ``/wp-admin`` itself,
    not ``/wp-admin/x`` nor ``/wp-admins`` (write ``/wp-admin/`` as a second entry for
    that).  Matching ignores letter case (``/.ENV`` and ``/WP-Admin`` are the same probe to
    a case-insensitive server): the entries are lowered here, and the caller passes the
    canonical path (:mod:`gateway.core.paths`) in lower case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "EVENTS",
    "OFFENCE_MEMORY_FACTOR",
    "PathMatcher",
    "ScoreState",
    "add_event",
    "ban_duration",
    "is_stale",
    "offences_forget_at",
    "score_at",
]

EVENTS = ("rate_limited", "not_found", "auth_failure", "bad_request", "suspicious_path")
"""The events that add to an IP's score (the fields of ``abuse.scores``)."""

OFFENCE_MEMORY_FACTOR = 2.0
"""Offences are remembered this many ``max_ban_s`` after the last ban ends."""


class PathMatcher:
    """Tells whether a request path is one of the ``suspicious_paths``.

    Exact entries live in a frozenset, entries ending in ``/`` in a tuple of prefixes
    tested by one ``str.startswith`` call: no regular expression, constant work per path
    for a given list.
    """

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, paths: Sequence[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"suspicious path {path!r} must start with '/'")
            low = path.lower()
            exact.add(low)
            if low.endswith("/") and low not in prefixes:
                prefixes.append(low)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def matches(self, path: str) -> bool:
        """True when ``path`` (lower case) is suspicious (a method, not ``__call__``: an
        instance's call costs a slot lookup more on every request)."""
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))

    def __repr__(self) -> str:
        return f"PathMatcher(exact={sorted(self._exact)!r}, prefixes={self._prefixes!r})"


@dataclass(slots=True)
class ScoreState:
    """One IP's points: the current bucket (from ``start``) and the one before it."""

    start: float = 0.0
    current: float = 0.0
    previous: float = 0.0


def _rolled(state: ScoreState, now: float, window_s: float) -> tuple[float, float, float]:
    """``(start, current, previous)`` of ``state`` moved forward to ``now``."""
    start, current, previous = state.start, state.current, state.previous
    if current == 0.0 and previous == 0.0:
        return now, 0.0, 0.0  # nothing counted: a fresh window starts now
    elapsed = now - start
    if elapsed < window_s:  # includes a clock that went back: stay in this bucket
        return start, current, previous
    if elapsed < 2 * window_s:
        return start + window_s, 0.0, current
    return now, 0.0, 0.0


def _weighted(start: float, current: float, previous: float, now: float, w: float) -> float:
    overlap = 1.0 - min(max((now - start) / w, 0.0), 1.0)
    return previous * overlap + current


def score_at(state: ScoreState, now: float, window_s: float) -> float:
    """The IP's score at ``now`` (reading it changes nothing)."""
    start, current, previous = _rolled(state, now, window_s)
    return _weighted(start, current, previous, now, window_s)


def add_event(state: ScoreState, event_score: float, now: float, window_s: float) -> float:
    """Add ``event_score`` points at ``now`` to ``state``; returns the new score."""
    start, current, previous = _rolled(state, now, window_s)
    current += event_score
    state.start, state.current, state.previous = start, current, previous
    return _weighted(start, current, previous, now, window_s)


def is_stale(state: ScoreState, now: float, window_s: float) -> bool:
    """True when every point of ``state`` has left the window (it can be dropped)."""
    return now - state.start >= 2 * window_s or (state.current == 0 and state.previous == 0)


def ban_duration(offences: int, ban_s: float, multiplier: float, max_ban_s: float) -> float:
    """Length of an IP's ``offences``-th ban (1 = first): ``ban_s * multiplier**(n-1)``,
    capped at ``max_ban_s``."""
    if offences < 1:
        raise ValueError("offences counts from 1")
    base = min(ban_s, max_ban_s)
    if multiplier <= 1.0 or offences == 1:
        return base
    try:
        duration = float(base) * float(multiplier) ** (offences - 1)
    except OverflowError:
        return max_ban_s
    return max_ban_s if math.isinf(duration) else min(duration, max_ban_s)


def offences_forget_at(ban_expires_at: float, max_ban_s: float) -> float:
    """When an IP's offence count is forgotten, given when its last ban expires."""
    return ban_expires_at + OFFENCE_MEMORY_FACTOR * max_ban_s
