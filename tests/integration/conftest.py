"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from tests.gw import serve


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """An upstream that answers every request with 200 "ok" (a test module may define its own)."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with serve(ok) as url_:
        yield url_
