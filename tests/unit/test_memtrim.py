"""When the proxy port gives heap memory back: after a burst of closed connections."""

from __future__ import annotations

from gateway.memtrim import ReleaseAfterBurst, malloc_trim


def _trimmer(burst: int = 1000) -> tuple[ReleaseAfterBurst, list[int]]:
    calls: list[int] = []

    def release() -> bool:
        calls.append(1)
        return True

    return ReleaseAfterBurst(burst, release), calls


def test_nothing_while_connections_grow_or_stay() -> None:
    t, calls = _trimmer()
    for n in (0, 10, 5000, 5000, 4990, 5000):
        t.sample(n)
    assert calls == []


def test_once_after_a_burst_of_closes() -> None:
    t, calls = _trimmer()
    t.sample(5000)
    t.sample(100)
    assert len(calls) == 1
    assert t.releases == 1
    t.sample(100)
    t.sample(50)  # a few more closes: not a burst
    assert len(calls) == 1


def test_not_when_more_than_half_stay_open() -> None:
    t, calls = _trimmer()
    t.sample(5000)
    t.sample(3000)  # 2,000 closed, but most are still open
    assert calls == []
    t.sample(2400)
    assert len(calls) == 1


def test_not_for_small_numbers() -> None:
    t, calls = _trimmer()
    t.sample(900)
    t.sample(0)
    assert calls == []


def test_again_after_the_next_peak() -> None:
    t, calls = _trimmer()
    for n in (5000, 0, 3000, 0):
        t.sample(n)
    assert len(calls) == 2


def test_malloc_trim_runs_here() -> None:
    assert malloc_trim() in (True, False)  # glibc: True; elsewhere a no-op
