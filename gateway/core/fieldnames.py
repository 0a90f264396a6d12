"""Header field names, decoded once and lower-cased once.

A peer sends the same few field names on every message (Host, User-Agent, Content-Type,
Date...). Decoded afresh, each name is a new string: decoding it, lower-casing it and
hashing both for every set and dict it is looked up in is done again on every message.
:func:`field_name` hands out one string for each name it has seen, and
:func:`lower_name` its lower-case spelling; both strings keep their hash, so the lookups
that follow compare and hash nothing new.

A :class:`NameTable` goes first: peers of one kind (the clients of an app, an upstream)
send their fields in the same order, so the name at each place of the last head is
compared with the bytes there (a length and a memory compare) before any hashing.

What is remembered is bounded: names up to :data:`LONGEST` bytes, at most :data:`MOST`
of them (past that the memory is emptied and filled again: a peer inventing names costs
what every name cost without it), and a table's first :data:`PLACES` places. A name not
remembered is decoded and lower-cased as it always was: the answers are the same either
way.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LONGEST", "MOST", "PLACES", "NameTable", "field_name", "lower_name"]

MOST: Final = 512  # distinct names remembered
LONGEST: Final = 64  # bytes: a longer name is decoded each time
PLACES: Final = 32  # the places of a head a NameTable remembers

_NAMES: Final[dict[bytes, str]] = {}
_LOWER: Final[dict[str, str]] = {}


def field_name(raw: bytes) -> str:
    """``raw`` decoded as latin-1 (the bytes as sent), the same string each time."""
    name = _NAMES.get(raw)
    if name is not None:
        return name
    name = raw.decode("latin-1")
    if len(raw) <= LONGEST:
        if len(_NAMES) >= MOST or len(_LOWER) >= MOST:
            _NAMES.clear()
            _LOWER.clear()
        _NAMES[raw] = name
        _LOWER[name] = name.lower()
    return name


def lower_name(name: str) -> str:
    """``name.lower()``, remembered (for a name :func:`field_name` gave, from the start)."""
    low = _LOWER.get(name)
    if low is None:
        low = name.lower()
        if len(name) <= LONGEST and len(_LOWER) < MOST:
            _LOWER[name] = low
    return low


class NameTable:
    """The name last seen at each place of a head, for heads of one kind (requests,
    upstream answers): :meth:`name` compares the bytes at that place before anything
    is hashed. One table is shared by every connection of its kind."""

    __slots__ = ("_names", "_raw")

    def __init__(self) -> None:
        self._raw: list[bytes] = []
        self._names: list[str] = []

    def name(self, raw: bytes, place: int) -> str:
        """:func:`field_name` of ``raw``, the field at ``place`` (0: the first) of its head."""
        known = self._raw
        if place < len(known) and known[place] == raw:
            return self._names[place]
        name = field_name(raw)
        if len(raw) <= LONGEST:
            if place < len(known):
                known[place] = raw
                self._names[place] = name
            elif place == len(known) and place < PLACES:
                known.append(raw)
                self._names.append(name)
        return name
