"""Writes made during one round of the event loop, sent together at its end.

A proxy under load answers many connections per round of the loop.  Written at once,
each answer wakes its reader (the client, the upstream) separately, and on a VM a
wake-up of a sleeping process on another CPU costs more than the send itself.  Queued
and sent together at the end of the round, the first send wakes the reader and the
others find it awake.  Each connection still gets one send per answer; the delay is at
most the rest of the current round (nothing when the loop is idle).

Order on a connection is kept by one rule: whoever writes to, or closes, a transport
directly calls :meth:`WriteBatcher.flush` first.
"""

from __future__ import annotations

import asyncio

__all__ = ["WriteBatcher"]


class WriteBatcher:
    """Queued writes of one loop, flushed by a ``call_soon`` callback once per round."""

    __slots__ = ("_loop", "_pending", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[tuple[asyncio.Transport, bytes]] = []
        self._scheduled = False

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
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
