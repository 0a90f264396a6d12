"""The proxy-port connection's state table: the legal moves, and that no other is."""

from __future__ import annotations

import itertools

import pytest

from gateway.downstream.state import DISCARDING, Conn, Event, IllegalMove, move

LEGAL = [
    (Conn.OPEN, Event.UPGRADE_WAITS, Conn.UPGRADING),
    (Conn.OPEN, Event.ERROR_WAITS, Conn.ERROR_PENDING),
    (Conn.OPEN, Event.QUEUE_FULL, Conn.CUT),
    (Conn.OPEN, Event.ANSWERED_EARLY, Conn.LINGERING),
    (Conn.ERROR_PENDING, Event.ERROR_WAITS, Conn.ERROR_PENDING),
    (Conn.ERROR_PENDING, Event.ANSWERED_EARLY, Conn.LINGERING),
    (Conn.UPGRADING, Event.ANSWERED_EARLY, Conn.LINGERING),
    (Conn.CUT, Event.ANSWERED_EARLY, Conn.CUT),
    *((state, Event.CLOSE, Conn.CLOSING) for state in Conn),
]


@pytest.mark.parametrize(("state", "event", "after"), LEGAL)
def test_legal_moves(state: Conn, event: Event, after: Conn) -> None:
    assert move(state, event) is after


ILLEGAL = sorted(
    set(itertools.product(Conn, Event)) - {(s, e) for s, e, _ in LEGAL},
    key=lambda pair: (pair[0].value, pair[1].value),
)


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_other_move_is_a_bug(state: Conn, event: Event) -> None:
    with pytest.raises(IllegalMove, match=f"{event.name} is not a move from {state.name}"):
        move(state, event)


def test_an_ending_connection_never_opens_again() -> None:
    assert all(after is not Conn.OPEN for state, _, after in LEGAL if state is not Conn.OPEN)


def test_what_arrives_is_dropped_once_the_answers_end() -> None:
    assert frozenset((Conn.CUT, Conn.LINGERING, Conn.CLOSING)) == DISCARDING
    # an upgrade keeps what arrives for the other protocol; a pending error stops parsing
    # where the parser stopped, and answers those before it
    assert Conn.UPGRADING not in DISCARDING
    assert Conn.ERROR_PENDING not in DISCARDING
    assert Conn.OPEN not in DISCARDING


def test_closing_is_final() -> None:
    assert {move(Conn.CLOSING, e) for e in Event if (Conn.CLOSING, e) not in ILLEGAL} == {
        Conn.CLOSING
    }
