"""Which bucket of sorted bounds a value falls in, as :func:`bisect.bisect_left` says.

Compiled, this loop runs on C doubles; ``bisect.bisect_left`` is a call through the
interpreter with a boxed float and a rich comparison a step. Pure Python, the loop is
bytecode and the C ``bisect`` module is the faster: the histograms of the request path
(the metrics' and the operator page's) call this one when :data:`COMPILED`, else
``bisect.bisect_left``.
"""

from __future__ import annotations

import types
from typing import Final

__all__ = ["COMPILED", "bucket"]


def bucket(bounds: tuple[float, ...], value: float) -> int:
    """``bisect.bisect_left(bounds, value)``: the number of bounds below ``value``
    (a value equal to a bound goes in that bound's bucket; NaN in the first)."""
    lo = 0
    hi = len(bounds)
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


COMPILED: Final = not isinstance(bucket, types.FunctionType)
"""This module runs compiled (its functions are not Python functions)."""
