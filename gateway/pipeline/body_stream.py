"""A request body streamed upstream as it arrives: the async generator the upstream leg
hands to the pool for a body larger than what it buffers.

A module of its own because it stays interpreted in the compiled build (mypyc compiles no
async generator) while the leg around it is compiled; the path of large uploads, not the
common one (a small body is read whole before the upstream is touched).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

import aiohttp

from gateway.downstream.messages import BodyError
from gateway.pipeline.context import ClientBodyError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.pipeline.context import Ctx
    from gateway.pipeline.request import PipelineRequest
    from gateway.pipeline.snapshot import Snapshot

GONE = "the client closed the connection before the end of the request body"


class BodyHolder(Protocol):
    """What the stream needs of the upstream leg: the count of body bytes held."""

    def unhold(self, ctx: Ctx) -> None: ...

    def too_large(self, ctx: Ctx, limit: int) -> ClientBodyError: ...


async def stream_body(
    leg: BodyHolder,
    request: PipelineRequest,
    snap: Snapshot,
    ctx: Ctx,
    held: list[bytes],
    *,
    end: float,
) -> AsyncIterator[bytes]:
    """The buffered start of a large body, then the rest as it arrives: a pause of
    ``body_idle_s``, or the exchange's end (``end``) reached, is a 408 (the upstream
    connection is then closed at once, not reused)."""
    ctx.body_open = True
    total = 0
    for chunk in held:
        total += len(chunk)
        yield chunk
    held.clear()
    leg.unhold(ctx)  # with the upstream now: no longer held here
    loop = asyncio.get_running_loop()
    limit = snap.max_body_bytes
    idle = snap.body_idle_s
    content = request.content
    while True:
        by = loop.time() + idle
        try:
            async with asyncio.timeout_at(min(by, end)):
                chunk = await content.readany()
        except TimeoutError:
            detail = (
                f"the request body stalled for {idle:g} s"
                if by <= end
                else "the request body was not received in time"
            )
            ctx.body_error = ClientBodyError(408, detail)
            raise ctx.body_error from None
        except (aiohttp.ClientPayloadError, BodyError) as exc:
            ctx.body_error = ClientBodyError(400, f"malformed request body: {exc}")
            raise ctx.body_error from None
        except ConnectionResetError:
            ctx.body_error = ClientBodyError(400, GONE)
            raise ctx.body_error from None
        if not chunk:
            ctx.body_open = False
            return
        total += len(chunk)
        if total > limit:
            raise leg.too_large(ctx, limit)
        yield chunk
