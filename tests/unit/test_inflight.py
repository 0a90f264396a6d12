"""Per-key in-flight counts of the concurrency policies."""

from __future__ import annotations

from gateway.core.inflight import InflightCounts


def test_the_n_plus_first_is_refused_and_freed_when_one_ends() -> None:
    c = InflightCounts()
    assert [c.take("p", "a", 2) for _ in range(3)] == [True, True, False]
    assert c.take("p", "b", 2)  # another key has its own count
    assert c.take("q", "a", 2)  # and another policy
    c.release("p", "a")
    assert c.take("p", "a", 2)
    assert c.count("p", "a") == 2


def test_entries_are_removed_when_their_count_returns_to_zero() -> None:
    c = InflightCounts()
    for i in range(1000):
        assert c.take("p", str(i), 1)
    for i in range(1000):
        c.release("p", str(i))
    assert len(c) == 0
    c.release("p", "never")  # a stray release leaves nothing behind
    assert len(c) == 0
