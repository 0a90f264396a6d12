"""Flow control of one proxy-port connection: when to read from the client, when to wait
for it to read (as uvicorn's ``flow_control.py``, with the holds the proxy port needs).

Reading is held back while any of three reasons holds, in any combination: an unread
request body over its high mark, requests queued behind the one being served, answers
the client does not read. Writing waits (:meth:`FlowControl.drain`) while the transport's
buffer is over its high mark; a client that takes no byte of its answers for
``request.body_idle_s`` meanwhile is cut off, so an answer it does not read cannot hold
memory, a connection and an upstream for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["FlowControl"]


class FlowControl:
    """The reading holds and the write back-pressure of one connection."""

    __slots__ = (
        "_body_paused",
        "_drain_waiter",
        "_idle_s",
        "_loop",
        "_stall_size",
        "_stall_timer",
        "pipeline_paused",
        "released",
        "transport",
        "write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_s: Callable[[], float]) -> None:
        self._loop = loop
        self._idle_s = idle_s  # read when a stall starts: the current config's bound
        self.transport: asyncio.Transport | None = None
        self._body_paused = False
        # requests queued behind the one served (read by the protocol before each resume)
        self.pipeline_paused = False
        self.write_paused = False
        # once the connection ends (it drops what arrives), the holds no longer steer reading
        self.released = False
        self._stall_timer: asyncio.TimerHandle | None = None  # armed while writing is paused
        self._stall_size = 0
        self._drain_waiter: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ reading

    def pause_body(self) -> None:
        if not self._body_paused:
            self._body_paused = True
            self._set_reading()

    def resume_body(self) -> None:
        if self._body_paused:
            self._body_paused = False
            self._set_reading()

    def pause_pipeline(self) -> None:
        if not self.pipeline_paused:
            self.pipeline_paused = True
            self._set_reading()

    def resume_pipeline(self) -> None:
        if self.pipeline_paused:
            self.pipeline_paused = False
            self._set_reading()

    def read_all(self) -> None:
        """Drop the reading holds and read on, whatever comes (a linger, a hand-off)."""
        self._body_paused = self.pipeline_paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    def _set_reading(self) -> None:
        transport = self.transport
        if transport is None or self.released:
            return
        if self._body_paused or self.pipeline_paused or self.write_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    # ------------------------------------------------------------------ writing

    def pause_writing(self) -> None:
        # A client that sends requests but does not read its answers gets no more served
        # until it does: without this, pipelined answers would pile up in memory.
        self.write_paused = True
        self._set_reading()
        transport = self.transport
        if self._stall_timer is None and transport is not None:
            self._stall_size = transport.get_write_buffer_size()
            self._stall_timer = self._loop.call_later(self._idle_s(), self._write_stalled)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.cancel_stall_timer()
        self._set_reading()
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        transport = self.transport
        if transport is None or not self.write_paused:
            return
        size = transport.get_write_buffer_size()
        if size < self._stall_size:  # it reads, slowly: progress restarts the time
            self._stall_size = size
            self._stall_timer = self._loop.call_later(self._idle_s(), self._write_stalled)
            return
        transport.abort()  # close() would wait for the unread bytes to be taken

    async def drain(self) -> None:
        if self.write_paused:
            if self.transport is None:
                raise ConnectionResetError("the client closed the connection")
            waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    def connection_lost(self) -> None:
        self.transport = None
        self.cancel_stall_timer()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client closed the connection"))
        self._drain_waiter = None
