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

Every request passes here, so the common case (no ``traceparent``) is two slices of a
batch of random hex and one small object; nothing is formatted until it is sent.
"""

from __future__ import annotations

import os
import random
import re
from typing import TYPE_CHECKING, Final, final

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "MAX_TRACESTATE",
    "TraceContext",
    "TraceIds",
    "parse_traceparent",
    "start_or_continue",
]

MAX_TRACESTATE: Final = 512
"""Longest ``tracestate`` passed on; the recommendation asks vendors to keep at least this
much, and a longer one is dropped whole rather than cut in the middle of an entry."""

# version, trace id, parent id, flags: lower-case hex only (the recommendation's rule)
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_SAMPLED: Final = 0x01


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
    unpredictability). One ``random_bytes`` call (``os.urandom``) makes the hex of
    ``batch`` pairs of ids at once; a request then cuts the next pair from it, all-zero
    ones left out, with no integer formatted. (Cut when taken, not all at once when
    drawn: a list of ready pairs costs more to make than the cuts it saves.)
    """

    __slots__ = ("_at", "_batch", "_hex", "_random_bytes")

    def __init__(
        self, random_bytes: Callable[[int], bytes] = os.urandom, *, batch: int = 256
    ) -> None:
        self._random_bytes = random_bytes
        self._batch = batch * 24  # a pair is 24 bytes: a trace id and a span id
        self._hex = ""  # the batch's hex: 48 characters a pair
        self._at = 0  # where the next pair starts in it

    def pair(self) -> tuple[str, str]:
        """The next ``(trace_id, span_id)``, drawing a new batch when one is spent."""
        while True:
            hx = self._hex
            at = self._at
            if at + 48 > len(hx):
                hx = self._hex = self._random_bytes(self._batch).hex()
                at = 0
            self._at = at + 48
            trace_id = hx[at : at + 32]
            span_id = hx[at + 32 : at + 48]
            if trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN:
                return trace_id, span_id


@final
class TraceContext:
    """The trace a request belongs to, as the gateway passes it upstream.

    A plain final class: every request has one, and a compiled build makes it in a
    native call (a named tuple is made by a generic ``tuple.__new__``). Its fields are
    only ever read.
    """

    __slots__ = ("parent_id", "sampled", "span_id", "trace_id", "traceparent", "tracestate")

    def __init__(  # noqa: PLR0917 - the fields, in order
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        sampled: bool,
        tracestate: str | None,
        traceparent: str,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id  # the gateway's own span: the upstream's parent
        self.parent_id = parent_id  # the client's span, when the request continued a trace
        self.sampled = sampled
        self.tracestate = tracestate
        # the value sent upstream: always version 00, the gateway's span as parent
        self.traceparent = traceparent

    def _fields(self) -> tuple[str, str, str | None, bool, str | None, str]:
        return (
            self.trace_id,
            self.span_id,
            self.parent_id,
            self.sampled,
            self.tracestate,
            self.traceparent,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TraceContext):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"TraceContext(trace_id={self.trace_id!r}, span_id={self.span_id!r}, "
            f"parent_id={self.parent_id!r}, sampled={self.sampled}, "
            f"tracestate={self.tracestate!r}, traceparent={self.traceparent!r})"
        )


def _context(
    trace_id: str, span_id: str, parent_id: str | None, sampled: bool, tracestate: str | None
) -> TraceContext:
    traceparent = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
    return TraceContext(trace_id, span_id, parent_id, sampled, tracestate, traceparent)


_IDS: Final = TraceIds()


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
        trace_id, span_id = ids.pair()
        # as _context() makes it, without its call
        traceparent_ = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
        return TraceContext(trace_id, span_id, None, sampled, None, traceparent_)
    trace_id, parent_id, flags = parsed
    state = None
    if tracestate:
        state = tracestate[0] if len(tracestate) == 1 else ",".join(tracestate)
        # kept only when it can be passed on as it came: printable ASCII, within the bound
        printable = state.isascii() and state.isprintable() and state.strip()
        if not printable or len(state) > MAX_TRACESTATE:
            state = None
    return _context(trace_id, ids.pair()[1], parent_id, bool(flags & _SAMPLED), state)
