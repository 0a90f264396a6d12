"""backend: redis with its URL variable unset: the gateway starts and on_backend_error applies."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.gw import backend_errors, base_config, running_gateway, url

pytestmark = pytest.mark.timeout(60)


def _cfg(upstream: str, on_error: str) -> dict[str, Any]:
    return base_config(
        upstream,
        rate_limit={
            "backend": "redis",
            "redis_url_env": "GATEWAY_TEST_UNSET_REDIS_URL",
            "on_backend_error": on_error,
            "policies": {"tight": {"requests": 1, "period_s": 60, "burst": 3}},
        },
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["tight"]}],
    )


async def _statuses(gw: Any, n: int) -> list[tuple[int, dict[str, Any]]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url(gw, "/x")) as r:
                body = await r.json(content_type=None) if r.status != 200 else {}
                out.append((r.status, body))
    return out


@pytest.mark.parametrize(
    ("on_error", "expected"),
    [
        ("allow", [200] * 5),
        ("local", [200, 200, 200, 429, 429]),  # the limits, in this process alone
        ("deny", [503] * 5),
    ],
)
async def test_on_backend_error_applies(upstream: str, on_error: str, expected: list[int]) -> None:
    async with running_gateway(_cfg(upstream, on_error), env={}) as gw:
        got = await _statuses(gw, 5)
        assert [status for status, _ in got] == expected
        if on_error == "deny":
            problem = got[0][1]
            assert problem["type"].endswith("ratelimit-unavailable")
        assert backend_errors(gw.runtime.metrics) == 5
