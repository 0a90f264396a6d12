"""Writes queued during a round of the loop reach their peers, in order, at its end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.batchwrite import Load, WriteBatcher

pytestmark = pytest.mark.asyncio


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


@pytest.fixture
async def two() -> AsyncIterator[tuple[list[asyncio.Transport], list[_Sink]]]:
    """Two real loopback connections: our transports and what their peers received."""
    loop = asyncio.get_running_loop()
    sinks: list[_Sink] = []

    def make() -> _Sink:
        sink = _Sink()
        sinks.append(sink)
        return sink

    server = await loop.create_server(make, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports = []
    for _ in range(2):
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transports.append(transport)
    await asyncio.sleep(0.05)
    try:
        yield transports, sinks
    finally:
        for t in transports:
            t.close()
        server.close()


async def _settle() -> None:
    await asyncio.sleep(0.05)


async def test_queued_writes_leave_at_the_end_of_the_round_in_order(two: Any) -> None:
    (t1, t2), (s1, s2) = two
    batcher = WriteBatcher(asyncio.get_running_loop())
    batcher.write(t1, b"a")
    batcher.write(t2, b"x")
    batcher.write(t1, b"b")
    assert t1.get_write_buffer_size() == 0  # (a direct write would not buffer either:
    # that nothing reaches the peer before the round ends is the test further down)
    await _settle()
    assert (s1.data, s2.data) == (b"ab", b"x")


async def test_flush_sends_at_once_and_keeps_order_with_a_direct_write(two: Any) -> None:
    (t1, _t2), (s1, _s2) = two
    batcher = WriteBatcher(asyncio.get_running_loop())
    batcher.write(t1, b"queued;")
    batcher.flush()  # as the server does before writing directly
    t1.write(b"direct")
    await _settle()
    assert s1.data == b"queued;direct"


async def test_a_closing_transport_is_skipped(two: Any) -> None:
    (t1, t2), (s1, s2) = two
    batcher = WriteBatcher(asyncio.get_running_loop())
    batcher.write(t1, b"lost")
    batcher.write(t2, b"kept")
    t1.close()
    await _settle()
    assert (s1.data, s2.data) == (b"", b"kept")


class _Closing(asyncio.Transport):
    """A transport that is closing and must not be written to."""

    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pytest.fail(f"wrote {bytes(data)!r} to a closing transport")


async def test_the_batcher_itself_skips_a_closing_transport() -> None:
    batcher = WriteBatcher(asyncio.get_running_loop())
    batcher.write(_Closing(), b"lost")
    batcher.flush()  # would fail the test if it wrote


async def _pair() -> tuple[asyncio.Transport, socket.socket]:
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    peer.settimeout(0.0)  # non-blocking
    transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=ours)
    return transport, peer


async def test_nothing_reaches_the_peer_before_the_round_ends() -> None:
    """A direct write would be in the peer's socket at once; a queued one is not."""
    transport, peer = await _pair()
    try:
        batcher = WriteBatcher(asyncio.get_running_loop())
        batcher.write(transport, b"late")
        with pytest.raises(BlockingIOError):
            peer.recv(16)
        await asyncio.sleep(0.01)
        assert peer.recv(16) == b"late"
    finally:
        transport.close()
        peer.close()


async def test_one_request_in_flight_writes_at_once() -> None:
    """Alone, nothing is gained by waiting for the round's end: the answer goes now (and
    the loop is spared a round)."""
    transport, peer = await _pair()
    try:
        load = Load()
        load.active = 1
        WriteBatcher(asyncio.get_running_loop(), load).write(transport, b"now")
        assert peer.recv(16) == b"now"
    finally:
        transport.close()
        peer.close()


@pytest.mark.parametrize("active", [2, 0])
async def test_several_requests_in_flight_or_none_are_batched(active: int) -> None:
    """Several: the others' answers go together. None: a write made outside a request
    (an error answered from the parser) is batched as it always was."""
    transport, peer = await _pair()
    try:
        load = Load()
        load.active = active
        WriteBatcher(asyncio.get_running_loop(), load).write(transport, b"late")
        with pytest.raises(BlockingIOError):
            peer.recv(16)
        await asyncio.sleep(0.01)
        assert peer.recv(16) == b"late"
    finally:
        transport.close()
        peer.close()


async def test_a_write_at_once_never_overtakes_a_queued_one() -> None:
    transport, peer = await _pair()
    try:
        load = Load()
        load.active = 2
        batcher = WriteBatcher(asyncio.get_running_loop(), load)
        batcher.write(transport, b"first;")
        load.active = 1
        batcher.write(transport, b"second")
        with pytest.raises(BlockingIOError):
            peer.recv(16)  # both wait for the round's end, in order
        await asyncio.sleep(0.01)
        assert peer.recv(32) == b"first;second"
    finally:
        transport.close()
        peer.close()
