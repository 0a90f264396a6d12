"""An upstream answer's body as it arrives: the async generator behind
:meth:`gateway.upstream.pool.LeanResponse.iter_body`.

A module of its own because it stays interpreted in the compiled build (mypyc compiles no
async generator) while the pool around it is compiled; a large or slow answer's path, not
the common one (a small answer is taken whole, ``body_if_complete``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.upstream.connection import UpstreamConnection


class Answer(Protocol):
    """What the reader needs of the answer (:class:`~gateway.upstream.pool.LeanResponse`)."""

    def begin_read(self) -> UpstreamConnection | None: ...

    def read_done(self) -> bool: ...

    def set_in_read(self, waiting: bool) -> None: ...

    def detach(self) -> None: ...

    def rest(self) -> list[bytes] | None: ...


async def body_chunks(resp: Answer) -> AsyncIterator[bytes]:
    conn = resp.begin_read()
    if conn is None:
        return
    while not resp.read_done():
        if conn.complete and conn.error is None:
            resp.detach()
            break
        resp.set_in_read(True)
        try:
            chunk = await conn.next_chunk()
        finally:
            resp.set_in_read(False)
        if not chunk:
            return
        yield chunk
    rest = resp.rest()
    if rest:
        rest.reverse()
        while rest:  # each piece let go of once passed on
            yield rest.pop()
