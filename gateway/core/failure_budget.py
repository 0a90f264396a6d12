"""A per-client budget of failures: how many costly attempts a client may get wrong.

Pure: no I/O, no clock; the caller passes ``now``.

Each client key has a GCRA bucket (:mod:`gateway.core.gcra`) of ``rate``: ``burst``
failures at once, then one more every ``period_s / requests`` seconds.  The caller asks
:meth:`FailureBudget.exhausted` (or :meth:`FailureBudget.wait_s`, for a Retry-After)
before the costly work and calls :meth:`FailureBudget.spend` when it failed; success
costs nothing.

Memory is bounded by ``max_keys``: the table is kept in order of the last failure, so
the client that failed least recently is forgotten first (it comes back with a full
bucket, which is what a client whose bucket refilled would have anyway).  A bucket that
is full again is dropped when met.
"""

from __future__ import annotations

from gateway.core.gcra import Rate, decide

__all__ = ["FailureBudget"]


class FailureBudget:
    """Failures allowed per client key: a GCRA bucket each, at most ``max_keys`` kept."""

    __slots__ = ("_tats", "max_keys", "rate")

    def __init__(self, rate: Rate, *, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.rate = rate
        self.max_keys = max_keys
        self._tats: dict[str, float] = {}  # key -> TAT, least recently failed first

    def __len__(self) -> int:
        return len(self._tats)

    def reconfigure(self, rate: Rate) -> None:
        """A new rate; the buckets are emptied when it differs (a TAT is tied to its rate)."""
        if rate != self.rate:
            self.rate = rate
            self._tats.clear()

    def exhausted(self, key: str, now: float) -> bool:
        """Whether ``key`` has no failure left to spend at ``now``."""
        return self.wait_s(key, now) > 0.0

    def wait_s(self, key: str, now: float) -> float:
        """Seconds until ``key`` may fail once more; 0.0 while it has a failure left."""
        tat = self._tats.get(key)
        if tat is None:
            return 0.0
        if tat <= now:  # full again: as good as unknown
            del self._tats[key]
            return 0.0
        return decide(tat, now, self.rate)[0].retry_after_s

    def spend(self, key: str, now: float) -> None:
        """Count one failure of ``key`` (nothing when its budget is already spent)."""
        tats = self._tats
        tat = tats.get(key)
        decision, new_tat = decide(tat, now, self.rate)
        if not decision.allowed:
            return
        if tat is not None:
            del tats[key]  # to the end: the most recent failure
        elif len(tats) >= self.max_keys:
            del tats[next(iter(tats))]
        tats[key] = new_tat
