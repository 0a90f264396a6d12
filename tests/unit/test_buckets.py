"""The histograms' bucket lookup agrees with bisect.bisect_left, edges included."""

from __future__ import annotations

import bisect
import math
import random

from gateway.core.buckets import bucket
from gateway.core.window_stats import BOUNDS_S

_PROMETHEUS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


def test_bucket_is_bisect_left_for_every_bound_and_between() -> None:
    rng = random.Random(7)
    for bounds in ((), (1.0,), (1.0, 2.0), _PROMETHEUS, BOUNDS_S):
        values = list(bounds) + [math.nextafter(b, -math.inf) for b in bounds]
        values += [math.nextafter(b, math.inf) for b in bounds]
        values += [rng.uniform(-1.0, 100.0) for _ in range(2000)]
        values += [0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1e300]
        for v in values:
            assert bucket(bounds, v) == bisect.bisect_left(bounds, v), (bounds, v)


def test_the_compiled_search_is_used_exactly_when_the_build_is_compiled() -> None:
    import gateway
    from gateway.core import buckets

    assert gateway.compiled() == buckets.COMPILED
