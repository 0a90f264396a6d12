"""Where a proxy-port connection is in its life, as one state and a table of its moves.

The bytes a client sends are parsed while the connection is :attr:`Conn.OPEN`. Each other
state is a way the connection is ending, and says what becomes of the bytes that still
arrive and of the requests already read:

* ``UPGRADING``: an upgrade (WebSocket) or CONNECT waits behind the requests being
  served; what arrives is kept, unparsed, for the protocol it is handed to.
* ``ERROR_PENDING``: a request could not be read; its error is answered after the ones
  read before it (parsing stops where the parser stopped).
* ``CUT``: the queue of pipelined requests is full; the ones queued are answered, the
  last with ``Connection: close``, and whatever else arrives is dropped unread.
* ``LINGERING``: the answer went out before the request body ended; the rest of the
  body is parsed (to find its end) and dropped, then the connection closes.
* ``CLOSING``: the connection is being closed; nothing that arrives is read.

Modelled on python-hyper/h11's ``_state.py``: the legal moves are data, a move the table
does not hold is a bug and raises. A move costs one dict lookup, and happens at most a
few times in a connection's life, never per request on a kept-alive connection.

The protocol's other flags are not part of this machine, because they are not exclusive
with it or with each other: the reasons reading is held back (an unread body, queued
requests, a client not reading its answers) combine freely (:mod:`.flow`), and where the
parser is in a message (in a head, in a chunked body) is the parser's own position.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["DISCARDING", "Conn", "Event", "IllegalMove", "move"]


class Conn(enum.Enum):
    # nothing that arrives is served (a plain attribute: read on every request, where
    # a set lookup would call the enum's hash in Python)
    discarding: bool

    OPEN = "open"
    UPGRADING = "upgrading"
    ERROR_PENDING = "error_pending"
    CUT = "cut"
    LINGERING = "lingering"
    CLOSING = "closing"


class Event(enum.Enum):
    UPGRADE_WAITS = "upgrade_waits"  # an upgrade read while requests are being served
    ERROR_WAITS = "error_waits"  # a request that could not be read, behind others
    QUEUE_FULL = "queue_full"  # the bound of queued requests was reached
    ANSWERED_EARLY = "answered_early"  # the last answer left before its request body ended
    CLOSE = "close"  # an error was written, or the connection is closed on purpose


class IllegalMove(RuntimeError):  # noqa: N818 - named as h11 names its protocol errors
    """A move the table does not allow: a bug in the protocol, not the client's fault."""


_MOVES: Final[dict[tuple[Conn, Event], Conn]] = {
    (Conn.OPEN, Event.UPGRADE_WAITS): Conn.UPGRADING,
    (Conn.OPEN, Event.ERROR_WAITS): Conn.ERROR_PENDING,
    (Conn.OPEN, Event.QUEUE_FULL): Conn.CUT,
    (Conn.OPEN, Event.ANSWERED_EARLY): Conn.LINGERING,
    # a later parse error (the parser does not resume after one) replaces the first
    (Conn.ERROR_PENDING, Event.ERROR_WAITS): Conn.ERROR_PENDING,
    (Conn.ERROR_PENDING, Event.ANSWERED_EARLY): Conn.LINGERING,
    # the queue was cut: the answers end, what arrives is still dropped (not parsed)
    (Conn.CUT, Event.ANSWERED_EARLY): Conn.CUT,
    (Conn.UPGRADING, Event.ANSWERED_EARLY): Conn.LINGERING,
    **{(state, Event.CLOSE): Conn.CLOSING for state in Conn},
}

# the states in which nothing that arrives is served
DISCARDING: Final = frozenset((Conn.CUT, Conn.LINGERING, Conn.CLOSING))
for _state in Conn:
    _state.discarding = _state in DISCARDING


def move(state: Conn, event: Event) -> Conn:
    """The state ``event`` leads to from ``state``; :class:`IllegalMove` if none."""
    try:
        return _MOVES[state, event]
    except KeyError:
        msg = f"{event.name} is not a move from {state.name}"
        raise IllegalMove(msg) from None
