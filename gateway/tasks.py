"""Stopping background tasks."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["stop_task"]


async def stop_task(task: asyncio.Task[Any] | None, *, retry_s: float = 0.25) -> None:
    """Cancel ``task`` and wait until it has ended.

    Code that swallows a cancellation (redis-py 8.1 does while it connects) is cancelled
    again every ``retry_s`` until the task ends, so a close never hangs on it.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=retry_s)
    with contextlib.suppress(asyncio.CancelledError):
        await task
