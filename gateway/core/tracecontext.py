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
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "MAX_TRACESTATE",
    "TraceContext",
    "parse_traceparent",
    "start_or_continue",
]

MAX_TRACESTATE = 512
"""Longest ``tracestate`` passed on; the recommendation asks vendors to keep at least this
much, and a longer one is dropped whole rather than cut in the middle of an entry."""

_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = 0x01

# Ids must be unique, not secret (W3C asks for randomness, not unpredictability): the
# Mersenne Twister, seeded from the OS, is enough and costs a fraction of `secrets`.
_ids = random.Random()


def _hex(value: str, length: int) -> bool:
    return len(value) == length and _HEX.issuperset(value)


def parse_traceparent(value: str) -> tuple[str, str, int] | None:
    """``(trace_id, parent_id, flags)`` of a valid ``traceparent``, else ``None``."""
    if len(value) < 55 or value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    version = value[:2]
    if not _hex(version, 2) or version == "ff":
        return None
    if len(value) > 55 and (version == "00" or value[55] != "-"):
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_hex(trace_id, 32) and _hex(parent_id, 16) and _hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace a request belongs to, as the gateway passes it upstream."""

    trace_id: str
    span_id: str
    """The gateway's own span: the upstream's parent."""
    parent_id: str | None
    """The client's span, when the request continued a trace."""
    sampled: bool
    tracestate: str | None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"


def _new_id(rng: random.Random, bits: int) -> str:
    while True:
        n = rng.getrandbits(bits)
        if n:
            return f"{n:0{bits // 4}x}"


def start_or_continue(
    traceparent: list[str] | None,
    tracestate: list[str] | None,
    sample_ratio: float,
    rng: random.Random = _ids,
) -> TraceContext:
    """The context for one request, from its ``traceparent`` and ``tracestate`` field lines."""
    parsed = parse_traceparent(traceparent[0]) if traceparent and len(traceparent) == 1 else None
    span_id = _new_id(rng, 64)
    if parsed is None:
        sampled = sample_ratio >= 1.0 or (sample_ratio > 0.0 and rng.random() < sample_ratio)
        return TraceContext(_new_id(rng, 128), span_id, None, sampled, None)
    trace_id, parent_id, flags = parsed
    state = ",".join(tracestate) if tracestate else None
    if state is not None and (not state.strip() or len(state) > MAX_TRACESTATE):
        state = None
    return TraceContext(trace_id, span_id, parent_id, bool(flags & _SAMPLED), state)
