"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the pure decisions.

SPEC section 12: a valid ``traceparent`` is continued (same trace id and sampled flag, the
gateway's own span id as the upstream's parent, ``tracestate`` kept); a missing or invalid
one starts a new trace, sampled at ``tracing.sample_ratio``, and its ``tracestate`` is
dropped (a state that belongs to no trace the gateway passes on would be a lie).

Parsing follows the recommendation's rules for version ``00`` and its forward-compatible
reading of later versions (the four known fields are read; a later version may append
fields after a ``-``). ``ff`` is never a valid version; upper-case hex, an all-zero trace
or parent id, or a version ``00`` value with anything after the flags are invalid. A
request with several ``traceparent`` fields is treated as having an invalid one.

Every request passes here, so the common case (no ``traceparent``) is a few slices of a
batch of random hex and one small object; nothing is formatted until it is sent.
"""

from __future__ import annotations

import os
import random
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "MAX_TRACESTATE",
    "TraceContext",
    "TraceIds",
    "parse_traceparent",
    "start_or_continue",
]

MAX_TRACESTATE = 512
"""Longest ``tracestate`` passed on; the recommendation asks vendors to keep at least this
much, and a longer one is dropped whole rather than cut in the middle of an entry."""

# version, trace id, parent id, flags: lower-case hex only (the recommendation's rule)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = 0x01


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """``(trace_id, parent_id, flags)`` of a valid ``traceparent``, else ``None``."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, parent_id, flags = m.groups()
    # version 00 is exactly 55 characters; a later one may go on after a '-'
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


class TraceIds:
    """Random trace and span ids as lower-case hex, cut from a batch of random bytes.

    Ids must be unique, not secret (the recommendation asks for randomness, not
    unpredictability), and one ``os.urandom`` call for ``batch`` requests costs far less
    than formatting a fresh integer for each.
    """

    __slots__ = ("_batch", "_hex", "_pos", "_random_bytes")

    def __init__(
        self, random_bytes: Callable[[int], bytes] = os.urandom, *, batch: int = 256
    ) -> None:
        self._random_bytes = random_bytes
        self._batch = batch * 24  # a new trace takes 24 bytes: a trace id and a span id
        self._hex = ""
        self._pos = 0

    def take(self, chars: int) -> str:
        """``chars`` hex characters, never all zeros."""
        while True:
            pos = self._pos
            end = pos + chars
            if end > len(self._hex):
                self._hex = self._random_bytes(self._batch).hex()
                pos, end = 0, chars
            self._pos = end
            value = self._hex[pos:end]
            if value.strip("0"):
                return value


class TraceContext:
    """The trace a request belongs to, as the gateway passes it upstream."""

    __slots__ = ("parent_id", "sampled", "span_id", "trace_id", "tracestate")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        sampled: bool,
        tracestate: str | None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        """The gateway's own span: the upstream's parent."""
        self.parent_id = parent_id
        """The client's span, when the request continued a trace."""
        self.sampled = sampled
        self.tracestate = tracestate

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


_IDS = TraceIds()


def start_or_continue(
    traceparent: list[str] | None,
    tracestate: list[str] | None,
    sample_ratio: float,
    ids: TraceIds = _IDS,
    chance: Callable[[], float] = random.random,
) -> TraceContext:
    """The context for one request, from its ``traceparent`` and ``tracestate`` field
    lines (None when absent); ``chance`` draws the sampling of a new trace."""
    parsed = parse_traceparent(traceparent[0]) if traceparent and len(traceparent) == 1 else None
    if parsed is None:
        sampled = sample_ratio >= 1.0 or (sample_ratio > 0.0 and chance() < sample_ratio)
        return TraceContext(ids.take(32), ids.take(16), None, sampled, None)
    trace_id, parent_id, flags = parsed
    state = None
    if tracestate:
        state = tracestate[0] if len(tracestate) == 1 else ",".join(tracestate)
        # kept only when it can be passed on as it came: printable ASCII, within the bound
        printable = state.isascii() and state.isprintable() and state.strip()
        if not printable or len(state) > MAX_TRACESTATE:
            state = None
    return TraceContext(trace_id, ids.take(16), parent_id, bool(flags & _SAMPLED), state)
