"""Flow control of one proxy-port connection: reading holds and write back-pressure."""

from __future__ import annotations

import asyncio

import pytest

from gateway.downstream.flow import FlowControl


class FakeTransport:
    """What flow control touches of a transport, recorded."""

    def __init__(self) -> None:
        self.reading = True
        self.calls: list[str] = []
        self.buffered = 0
        self.aborted = False

    def pause_reading(self) -> None:
        self.reading = False
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.reading = True
        self.calls.append("resume")

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted = True


def _flow(idle_s: float = 10.0) -> tuple[FlowControl, FakeTransport]:
    flow = FlowControl(asyncio.get_running_loop(), lambda: idle_s)
    transport = FakeTransport()
    flow.transport = transport  # type: ignore[assignment]
    return flow, transport


async def test_reading_resumes_only_when_no_hold_is_left() -> None:
    flow, transport = _flow()
    flow.pause_body()
    flow.pause_pipeline()
    assert not transport.reading
    flow.resume_body()
    assert not transport.reading  # queued requests still hold it
    flow.pause_writing()
    flow.resume_pipeline()
    assert not transport.reading  # the client does not read its answers
    flow.resume_writing()
    assert transport.reading


async def test_holds_are_counted_once() -> None:
    flow, transport = _flow()
    flow.pause_body()
    flow.pause_body()
    assert transport.calls == ["pause"]
    flow.resume_body()
    flow.resume_body()
    assert transport.calls == ["pause", "resume"]


async def test_a_released_connection_reads_on_whatever_holds() -> None:
    flow, transport = _flow()
    flow.pause_body()
    flow.released = True
    flow.read_all()
    assert transport.reading
    flow.pause_pipeline()
    assert transport.reading  # the holds no longer steer reading


async def test_drain_waits_for_the_client_to_read() -> None:
    flow, _ = _flow()
    await flow.drain()  # not paused: no wait
    flow.pause_writing()
    waiter = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    assert not waiter.done()
    flow.resume_writing()
    await waiter


async def test_drain_fails_when_the_client_leaves() -> None:
    flow, _ = _flow()
    flow.pause_writing()
    waiter = asyncio.ensure_future(flow.drain())
    await asyncio.sleep(0)
    flow.connection_lost()
    with pytest.raises(ConnectionResetError):
        await waiter


async def test_a_client_that_takes_nothing_is_cut_off() -> None:
    flow, transport = _flow(idle_s=0.05)
    transport.buffered = 1000
    flow.pause_writing()
    await asyncio.sleep(0.08)
    assert transport.aborted


async def test_a_client_that_reads_slowly_keeps_its_connection() -> None:
    flow, transport = _flow(idle_s=0.05)
    transport.buffered = 1000
    flow.pause_writing()
    await asyncio.sleep(0.03)
    transport.buffered = 500  # progress: the time starts again
    await asyncio.sleep(0.04)
    assert not transport.aborted
    flow.resume_writing()
    await asyncio.sleep(0.08)
    assert not transport.aborted


async def test_the_idle_bound_is_read_when_a_stall_starts() -> None:
    bound = [10.0]
    flow = FlowControl(asyncio.get_running_loop(), lambda: bound[0])
    transport = FakeTransport()
    transport.buffered = 1
    flow.transport = transport  # type: ignore[assignment]
    bound[0] = 0.02  # a reload after the connection was made
    flow.pause_writing()
    await asyncio.sleep(0.05)
    assert transport.aborted
