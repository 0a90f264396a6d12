"""A parser error is answered by what the parser's callback raised, whatever other
exception happens to be current when the bytes arrive.

llhttp turns an exception raised in a callback into an error of its own; the cause must
not be read from implicit exception chaining, which takes whatever exception is being
handled at that moment (a compiled build can leave an already handled one current in the
event loop's callbacks: a refused upstream connection made the next smuggling attempt a
plain 400 instead of its 501).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.upstream.connection import HEAD_TOO_LARGE, UpstreamConnection, UpstreamError
from tests.integration.test_http1 import serving


class _Transport:
    """Records what is written; enough of a transport for one exchange."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.data += part

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None: ...


def _within_a_handled_exception(feed: Any, data: bytes) -> None:
    try:
        raise ConnectionRefusedError(111, "an earlier, already handled failure")  # noqa: TRY301 - what is tested
    except ConnectionRefusedError:
        feed(data)


async def test_a_framing_error_keeps_its_status_under_another_handled_exception() -> None:
    async with serving() as (server, _port, errors):
        proto = server()
        transport = _Transport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        _within_a_handled_exception(
            proto.data_received,
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        )
        assert bytes(transport.data).startswith(b"HTTP/1.1 501 "), bytes(transport.data)
        assert errors == [501]
        assert transport.closed


async def test_a_head_too_large_keeps_its_431_under_another_handled_exception() -> None:
    async with serving() as (server, _port, errors):
        proto = server()
        transport = _Transport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        fields = b"".join(b"X-F%d: v\r\n" % n for n in range(300))
        _within_a_handled_exception(
            proto.data_received, b"GET /x HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
        )
        assert bytes(transport.data).startswith(b"HTTP/1.1 431 "), bytes(transport.data)
        assert errors == [431]


async def test_an_upstream_head_too_large_is_named_so_under_another_handled_exception() -> None:
    conn = UpstreamConnection(asyncio.get_running_loop())
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.reset()
    fields = b"".join(b"X-F%d: v\r\n" % n for n in range(300))
    _within_a_handled_exception(conn.data_received, b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
    assert isinstance(conn.error, UpstreamError)
    assert conn.error.kind == HEAD_TOO_LARGE
    assert conn.head().exception() is conn.error


async def test_an_upstream_transfer_coding_is_named_so_under_another_handled_exception() -> None:
    conn = UpstreamConnection(asyncio.get_running_loop())
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.reset()
    _within_a_handled_exception(
        conn.data_received,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
    )
    assert isinstance(conn.error, UpstreamError)
    assert "transfer coding" in str(conn.error)
    assert conn.head().exception() is conn.error
