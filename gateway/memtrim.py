"""Heap memory given back to the operating system after many connections close.

Each open connection holds a few kilobytes of C heap (the event loop's transport and
handle, buffers) and Python objects. When thousands close at once the allocators keep
what they freed for reuse, so the process's RSS stays at its peak. glibc's
``malloc_trim`` returns the free pages at the top of the heap and, since glibc 2.8,
whole free pages inside it (``madvise``). It walks the heap, so it is called from the
once-a-second housekeeping, and only after a burst of closes, never per request.
Elsewhere (musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["ReleaseAfterBurst", "malloc_trim"]


def _load() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _load()


def malloc_trim() -> bool:
    """Give free heap pages back to the OS; False when the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class ReleaseAfterBurst:
    """Decides, from the count of open connections sampled once a second, when memory is
    worth giving back: once at least ``burst`` connections have closed since the peak
    and at most half of the peak remain open."""

    __slots__ = ("_burst", "_peak", "_release", "releases")

    def __init__(self, burst: int = 1000, release: Callable[[], bool] = malloc_trim) -> None:
        self._burst = burst
        self._peak = 0
        self._release = release
        self.releases = 0

    def sample(self, open_now: int) -> None:
        if open_now >= self._peak:
            self._peak = open_now
            return
        if self._peak - open_now >= self._burst and open_now * 2 <= self._peak:
            self._peak = open_now
            if self._release():
                self.releases += 1
