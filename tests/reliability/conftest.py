"""Fixtures shared by the reliability suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.reliability.support import RawUpstream, UpstreamProcess


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    """An upstream in a process of its own, so a test can SIGKILL it."""
    up = UpstreamProcess()
    up.start()
    try:
        yield up
    finally:
        up.kill()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    """An in-process upstream answering at once (see :class:`RawUpstream`)."""
    up = RawUpstream()
    await up.start()
    try:
        yield up
    finally:
        await up.close()
