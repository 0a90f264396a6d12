"""Requests in flight per key, for the concurrency policies of SPEC section 10.

One count per (policy, key) present while it is above 0: the memory held is bounded by
the requests in flight, never by the number of keys seen.
"""

from __future__ import annotations

__all__ = ["InflightCounts"]


class InflightCounts:
    """Per-replica counts of requests in flight, keyed by (policy, key)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, policy: str, key: str) -> int:
        return self._counts.get((policy, key), 0)

    def take(self, policy: str, key: str, limit: int) -> bool:
        """Count one more request for the key, unless it has ``limit`` in flight."""
        k = (policy, key)
        n = self._counts.get(k, 0)
        if n >= limit:
            return False
        self._counts[k] = n + 1
        return True

    def release(self, policy: str, key: str) -> None:
        """One request of the key ended; the entry goes when its count is back to 0."""
        k = (policy, key)
        n = self._counts.get(k, 0)
        if n <= 1:
            self._counts.pop(k, None)
        else:
            self._counts[k] = n - 1
