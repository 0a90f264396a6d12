"""Ban evidence: the scored events that led to a ban (SPEC section 12).

Each scored abuse event of a client is remembered as an :class:`Evidence` record; a ban
keeps the last :data:`MAX_EVIDENCE` of them, so "why was this client banned?" has an
answer.  A record holds what the gateway decided on, never what the client wrote: the
canonical path (:mod:`gateway.core.paths`) without its query, clipped to
:data:`MAX_PATH_CHARS`, never the raw target.

Records travel through Redis as one JSON object each; a list of them is the records
joined by newlines (JSON text never holds a raw newline), so a Lua script can append
and trim them without a JSON parser.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

__all__ = [
    "MAX_EVIDENCE",
    "MAX_PATH_CHARS",
    "NOTHING_SEEN",
    "Evidence",
    "Seen",
    "clip_path",
    "decode_many",
    "keep_last",
]

MAX_EVIDENCE = 10
"""Scored events a ban (and a scored client not yet banned) keeps, the newest."""

MAX_PATH_CHARS = 256
"""A longer canonical path is cut here (and marked with a trailing ``...``): evidence
is kept per client, and its memory must not grow with what a client sends."""

_FIELDS = ("at", "reason", "method", "path", "status", "request_id")


class Seen(NamedTuple):
    """What the pipeline knew of a request when it scored it; ``None`` where it knew
    nothing (a request the parser refused has no method or path; a request still on
    its way upstream has no status yet)."""

    method: str | None = None
    path: str | None = None
    status: int | None = None
    request_id: str | None = None


NOTHING_SEEN = Seen()


def clip_path(path: str | None) -> str | None:
    """``path`` cut to :data:`MAX_PATH_CHARS` characters."""
    if path is None or len(path) <= MAX_PATH_CHARS:
        return path
    return path[: MAX_PATH_CHARS - 3] + "..."


@dataclass(frozen=True, slots=True)
class Evidence:
    """One scored event: when (unix time), which event, and the request's facts."""

    at: float
    reason: str
    method: str | None
    path: str | None
    status: int | None
    request_id: str | None

    @classmethod
    def of(cls, at: float, reason: str, seen: Seen) -> Evidence:
        return cls(at, reason, seen.method, clip_path(seen.path), seen.status, seen.request_id)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``/admin/bans``, ``/admin/stats``)."""
        return {
            "at": round(self.at, 3),
            "reason": self.reason,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "request_id": self.request_id,
        }

    def encode(self) -> str:
        """One line of JSON."""
        return orjson.dumps(self.as_dict()).decode()

    @classmethod
    def decode(cls, line: str) -> Evidence | None:
        """The record of :meth:`encode`; ``None`` for a line that does not parse."""
        try:
            r = orjson.loads(line)
            status = r["status"]
            return cls(
                float(r["at"]),
                str(r["reason"]),
                _text(r["method"]),
                clip_path(_text(r["path"])),
                None if status is None else int(status),
                _text(r["request_id"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def decode_many(text: str | None) -> list[Evidence]:
    """The records of newline-joined lines, oldest first; unparsable lines are left out."""
    if not text:
        return []
    found = (Evidence.decode(line) for line in text.split("\n")[-MAX_EVIDENCE:] if line)
    return [e for e in found if e is not None]


def keep_last(records: Iterable[Evidence]) -> deque[Evidence]:
    """A bounded queue of ``records`` (the last :data:`MAX_EVIDENCE`)."""
    return deque(records, maxlen=MAX_EVIDENCE)
