"""Awaiting a check at most its timeout, and the short text of a check's error."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from gateway.core.health import ComponentHealth

__all__ = ["Bounded", "Report", "describe"]

_T = TypeVar("_T")

_MAX_MESSAGE = 200

Report = Callable[[ComponentHealth, float | None], None]
"""How a check hands over a result (and how long the round took, in seconds)."""


def describe(exc: BaseException) -> str:
    """A short, single-line description of a check error."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        text = exc.os_error.strerror or str(exc.os_error)
        return f"connect failed: {text}"
    text = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


class Bounded:
    """Awaits checks with a deadline; keeps the ones it stopped waiting for until they end.

    The work runs in a task of its own that is cancelled (not awaited) when the time is
    up, so a peer that swallows the cancellation cannot hang the caller (a PostgreSQL
    port that accepts connections and never answers, say).
    """

    __slots__ = ("orphans",)

    def __init__(self) -> None:
        self.orphans: set[asyncio.Task[Any]] = set()

    async def __call__(self, aw: Awaitable[_T], timeout_s: float) -> _T:
        """Await ``aw`` at most ``timeout_s``; on timeout stop waiting at once."""
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            self._adopt(task)
            raise
        if not done:
            task.cancel()
            self._adopt(task)
            raise TimeoutError
        return task.result()

    def _adopt(self, task: asyncio.Task[Any]) -> None:
        self.orphans.add(task)
        task.add_done_callback(self._orphan_done)

    def _orphan_done(self, task: asyncio.Task[Any]) -> None:
        self.orphans.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure of an abandoned check is expected
