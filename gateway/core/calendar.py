"""Calendar quotas (``period: hour | day | month``): windows aligned to UTC boundaries.

Pure: the caller passes the time (seconds since the epoch, UTC).

A quota of ``N`` requests per window is decided with the GCRA's single number per key,
on a *virtual clock* that stands still within a window and jumps by ``N`` at each
boundary: window ``i`` is the instant ``i * N``, each request advances the key's TAT by
its cost, and a request is allowed while ``TAT - i * N <= N`` after it. A TAT from an
earlier window is at most that window's instant plus ``N``, so at most the instant of the
current one: it reads as an absent key, and the stores may drop it as they drop any
refilled key. All of it is whole numbers (exact in a double up to 2**53: a quota of a
million a day for 25 000 years), so there is no rounding allowance. The Redis script
(``lua/gcra.lua``) does the same arithmetic on Redis's clock.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal, NamedTuple

from gateway.core.gcra import Decision, Rate

__all__ = [
    "PERIOD_CODES",
    "Period",
    "Window",
    "decide_quota",
    "month_length_s",
    "window_at",
]

Period = Literal["hour", "day", "month"]

PERIOD_CODES: dict[str, int] = {"hour": 1, "day": 2, "month": 3}
"""How the Redis script names a period (0: a rolling rate)."""

_HOUR = 3600
_DAY = 86400


class Window(NamedTuple):
    """One calendar window: its number since the epoch and its bounds (epoch seconds)."""

    number: int
    start: float
    end: float


def _month_start(year: int, month: int) -> float:
    return dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()


def window_at(period: str, t: float) -> Window:
    """The window of ``period`` that holds the instant ``t``."""
    if period == "hour":
        i = int(t // _HOUR)
        return Window(i, float(i * _HOUR), float((i + 1) * _HOUR))
    if period == "day":
        i = int(t // _DAY)
        return Window(i, float(i * _DAY), float((i + 1) * _DAY))
    if period != "month":
        raise ValueError(f"unknown period {period!r}")
    day = dt.date(1970, 1, 1) + dt.timedelta(days=int(t // _DAY))
    year, month = day.year, day.month
    following = (year + 1, 1) if month == 12 else (year, month + 1)
    return Window(year * 12 + month - 1, _month_start(year, month), _month_start(*following))


def month_length_s(t: float) -> int:
    """The length in seconds of the UTC month that holds ``t`` (``w=`` of a month)."""
    w = window_at("month", t)
    return int(w.end - w.start)


class WindowClock:
    """The current window of one period, recomputed only when a boundary is crossed."""

    __slots__ = ("_period", "_window")

    def __init__(self, period: str) -> None:
        self._period = period
        self._window = Window(-1, 0.0, 0.0)

    def at(self, t: float) -> Window:
        w = self._window
        if not (w.start <= t < w.end):
            w = self._window = window_at(self._period, t)
        return w


def decide_quota(
    tat: float | None, now: float, window: Window, rate: Rate, cost: int = 1
) -> tuple[Decision, float]:
    """Decide one request of ``cost`` against a calendar quota of ``rate.burst`` requests
    a window (module docstring); ``now`` is the time (epoch seconds) in ``window``.

    Return the decision (``retry_after_s`` and ``reset_s``: the time until the window
    ends) and the key's new TAT (unchanged when refused)."""
    if cost < 1:
        raise ValueError(f"cost must be >= 1, got {cost}")
    quota = rate.burst
    vnow = window.number * quota
    base = tat if tat is not None and tat > vnow else vnow
    used = base - vnow + cost
    left = window.end - now
    if used <= quota:
        return Decision(True, int(quota - used), 0.0, left), base + cost  # noqa: FBT003
    return Decision(False, 0, left, left), (vnow if tat is None else tat)  # noqa: FBT003
