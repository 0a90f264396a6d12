"""Header field names, decoded once and lower-cased once.

A peer sends the same few field names on every message (Host, User-Agent, Content-Type,
Date...). Decoded afresh, each name is a new string: decoding it, lower-casing it and
hashing both for every set and dict it is looked up in is done again on every message.
:func:`field_name` hands out one string for each name it has seen, and
:func:`lower_name` its lower-case spelling; both strings keep their hash, so the lookups
that follow compare and hash nothing new.

What is remembered is bounded: names up to :data:`LONGEST` bytes, at most
:data:`MOST` of them. Past that the memory is emptied and filled again (a peer
inventing names costs what every name cost without it). A name not remembered is
decoded and lower-cased as it always was: the answers are the same either way.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LONGEST", "MOST", "field_name", "lower_name"]

MOST: Final = 512  # distinct names remembered
LONGEST: Final = 64  # bytes: a longer name is decoded each time

_NAMES: Final[dict[bytes, str]] = {}
_LOWER: Final[dict[str, str]] = {}


def field_name(raw: bytes) -> str:
    """``raw`` decoded as latin-1 (the bytes as sent), the same string each time."""
    name = _NAMES.get(raw)
    if name is not None:
        return name
    name = raw.decode("latin-1")
    if len(raw) <= LONGEST:
        if len(_NAMES) >= MOST:
            _NAMES.clear()
            _LOWER.clear()
        _NAMES[raw] = name
        _LOWER[name] = name.lower()
    return name


def lower_name(name: str) -> str:
    """``name.lower()``: the remembered spelling for a name :func:`field_name` gave."""
    low = _LOWER.get(name)
    return low if low is not None else name.lower()
