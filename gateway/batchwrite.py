"""Writes made during one round of the event loop, sent together at its end.

A proxy under load answers many connections per round of the loop.  Written at once,
each answer wakes its reader (the client, the upstream) separately, and on a VM a
wake-up of a sleeping process on another CPU costs more than the send itself.  Queued
and sent together at the end of the round, the first send wakes the reader and the
others find it awake.  Each connection still gets one send per answer; the delay is at
most the rest of the current round (nothing when the loop is idle).

Alone, a request gains nothing from waiting: with one request in flight in the process
(:data:`SERVING`, counted by the proxy port until its answer is written) and nothing
queued, a write goes out at once, which spares the loop a round (its poll and
callbacks) twice a request. Writes made outside a request (none in flight) are batched.

Order on a connection is kept by one rule: whoever writes to, or closes, a transport
directly calls :meth:`WriteBatcher.flush` first.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["SERVING", "Load", "WriteBatcher"]


class Load:
    """Requests in flight: the proxy port counts each from its handler's start until its
    answer is written."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0


# The process's one count, shared by the proxy port's batcher and the upstream pool's.
SERVING: Final = Load()


class WriteBatcher:
    """Queued writes of one loop, flushed by a ``call_soon`` callback once per round.

    ``load``: write at once when it shows exactly one request in flight and nothing is
    queued; without it, every write waits for the round's end.
    """

    __slots__ = ("_load", "_loop", "_pending", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop, load: Load | None = None) -> None:
        self._loop = loop
        self._load = load
        self._pending: list[tuple[asyncio.Transport, bytes]] = []
        self._scheduled = False

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        load = self._load
        if load is not None and load.active == 1 and not self._pending:
            transport.write(data)
            return
        self._pending.append((transport, data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Send everything queued now (before a direct write or a close)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for transport, data in pending:
            if not transport.is_closing():  # the peer went away meanwhile: nothing to send
                transport.write(data)
