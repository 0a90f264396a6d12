"""The generic cell rate algorithm (GCRA): token-bucket limits in one number per key.

Pure: no I/O, no clock; the caller passes ``now`` (seconds on any monotonic scale).

A key's whole state is its *theoretical arrival time* (TAT): the instant at which its
bucket is full again.  With the emission interval ``T = period_s / requests`` and the
tolerance ``tau = T * burst``::

    new_tat = max(tat, now) + cost * T
    allowed = new_tat - tau <= now

so a fresh key (no TAT, or a TAT in the past) may make ``burst`` requests at once and
then one more every ``T`` seconds.  A refused request leaves the TAT unchanged.  A key
whose TAT is in the past is indistinguishable from an absent key, which is what lets
the stores forget it.

A clock that steps backwards never grants more: the TAT only grows, so an earlier
``now`` makes the test ``new_tat - tau <= now`` harder to pass, never easier.

Float TATs accumulate rounding error over a burst (at most half an ulp of the clock
value per admission); a request up to :data:`EPSILON_S` (1 microsecond) plus that bound
early is treated as on time, so the last request of a burst is never lost to rounding.
That tolerance cannot add a request over any span of time (each admission still
advances the TAT by ``T``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import final

__all__ = ["EPSILON_S", "Decision", "Rate", "decide"]

EPSILON_S = 1e-6
_ULP = 2.0**-52  # relative spacing of doubles: |x| * _ULP bounds one rounding error


@dataclass(frozen=True, slots=True)
class Rate:
    """``requests`` per ``period_s`` seconds, with up to ``burst`` at once; or, with
    ``calendar`` (``hour``, ``day``, ``month``: :mod:`gateway.core.calendar`), a quota of
    ``requests`` a UTC window, counted in whole units (``period_s`` is then ``requests``
    and ``burst`` the quota: one unit a request)."""

    requests: int
    period_s: float
    burst: int
    calendar: str | None = None
    # derived once (a rate is read on every request): T, tau, and the rounding allowance
    emission_s: float = field(init=False, repr=False, compare=False)
    tolerance_s: float = field(init=False, repr=False, compare=False)
    _eps_s: float = field(init=False, repr=False, compare=False)
    _eps_per_s: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s must be a positive number, got {self.period_s}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")
        t = self.period_s / self.requests
        setattr_ = object.__setattr__
        setattr_(self, "emission_s", t)
        setattr_(self, "tolerance_s", self.period_s * self.burst / self.requests)
        # below half an emission interval, so the allowance never admits one more
        setattr_(self, "_eps_s", min(EPSILON_S, t / 2))
        setattr_(self, "_eps_per_s", self.burst * _ULP)

    @classmethod
    def quota(cls, requests: int, period: str) -> Rate:
        """A calendar quota of ``requests`` a ``period``."""
        return cls(requests, float(requests), requests, period)


@final
class Decision:
    """The answer for one key and one policy, made for each policy of each request: a
    plain class rather than a named tuple, which a compiled build makes in a native
    call instead of a generic ``tuple.__new__`` (the fields are only ever read)."""

    __slots__ = ("allowed", "remaining", "reset_s", "retry_after_s")

    def __init__(self, allowed: bool, remaining: int, retry_after_s: float, reset_s: float) -> None:
        self.allowed = allowed
        self.remaining = remaining  # requests left after this one (0 when refused)
        self.retry_after_s = retry_after_s  # 0.0 when allowed; else until one would pass
        self.reset_s = reset_s  # seconds until the bucket is full again

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return (
            self.allowed == other.allowed
            and self.remaining == other.remaining
            and self.retry_after_s == other.retry_after_s
            and self.reset_s == other.reset_s
        )

    __hash__ = None  # type: ignore[assignment]  # (mutable, compared by value)

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, remaining={self.remaining}, "
            f"retry_after_s={self.retry_after_s}, reset_s={self.reset_s})"
        )


def decide(tat: float | None, now: float, rate: Rate, cost: int = 1) -> tuple[Decision, float]:
    """Decide one request of ``cost`` units; return the decision and the new TAT.

    ``tat`` is the key's stored TAT (``None`` for a key never seen).  When refused the
    returned TAT is the one given (``now`` for an absent key, which is equivalent).
    A ``cost`` above ``burst`` can never pass; its ``retry_after_s`` is then what it
    would be with a bucket deep enough to hold it.
    """
    if cost < 1:
        raise ValueError(f"cost must be >= 1, got {cost}")
    t = rate.emission_s
    base = tat if tat is not None and tat > now else now
    new_tat = base + cost * t
    # How far the new TAT stays inside the tolerance; >= 0 means allowed.
    slack = rate.tolerance_s - (new_tat - now)
    eps = rate._eps_s + rate._eps_per_s * abs(new_tat)
    if slack >= -eps:
        remaining = int((slack + eps) / t)
        most = rate.burst - cost  # a full bucket after this request
        remaining = min(remaining, most)
        return Decision(True, remaining, 0.0, new_tat - now), new_tat  # noqa: FBT003
    refused = Decision(False, 0, -slack, base - now)  # noqa: FBT003
    return refused, (now if tat is None else tat)
