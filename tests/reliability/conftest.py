"""Fixtures shared by the reliability suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability.support import UpstreamProcess


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    """An upstream in a process of its own, so a test can SIGKILL it."""
    up = UpstreamProcess()
    up.start()
    try:
        yield up
    finally:
        up.kill()
