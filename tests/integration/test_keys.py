"""Client keys over real sockets, on both backends: values are never cut, so two clients
whose header values share a long prefix keep two budgets; every path (plain requests,
WebSocket upgrades, /admin/explain) computes the same key for the same bytes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.core.keys import credential_form, digest
from tests.gw import admin_url, base_config, raw_exchange, running_gateway

pytestmark = pytest.mark.timeout(60)

TOKEN = "keys-test-token"
E_ACUTE = "\u00e9".encode()  # 2 bytes
E_GRAVE = "\u00e8".encode()
EURO = "\u20ac".encode()  # 3 bytes


@pytest.fixture(params=["memory", "redis"])
async def gateway(request: pytest.FixtureRequest, upstream: str) -> AsyncIterator[Gateway]:
    """A gateway whose one policy keys on Authorization: 2 requests a minute."""
    policy = f"tok-{uuid.uuid4().hex[:8]}"  # a fresh key space on the shared Redis
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN}
    rate_limit: dict[str, Any] = {
        "policies": {
            policy: {"requests": 1, "period_s": 60, "burst": 2, "key": "header:Authorization"}
        }
    }
    if request.param == "redis":
        env["GATEWAY_REDIS_URL"] = request.getfixturevalue("redis_url")
        rate_limit["backend"] = "redis"
    cfg = base_config(
        upstream,
        rate_limit=rate_limit,
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": [policy]}],
        abuse={"enabled": False},
    )
    async with running_gateway(cfg, env) as gw:
        yield gw


async def _status(gw: Gateway, token: bytes, *, upgrade: bool = False) -> int:
    """The status of one request carrying ``Authorization: token`` (raw bytes)."""
    assert gw.proxy_port is not None
    extra = (
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        if upgrade
        else b"Connection: close\r\n"
    )
    head = b"GET /x HTTP/1.1\r\nHost: x\r\n" + extra + b"Authorization: " + token + b"\r\n\r\n"
    answer = await raw_exchange(gw.proxy_port, head, wait_s=0.5)
    return int(answer.split(b" ", 2)[1])


PAIRS = [
    # bearer tokens with the same header and claims: the old 256-character cut made one
    (b"Bearer " + b"a" * 300 + b"1", b"Bearer " + b"a" * 300 + b"2"),
    (b"t" * 256 + b"x", b"t" * 256 + b"y"),
    (b"a" * 63, b"a" * 62 + b"b"),
    (b"a" * 64, b"a" * 63 + b"b"),
    (b"a" * 65, b"a" * 64 + b"b"),
    (b"a" * 64, b"a" * 65),
    (b"a" * 62 + E_ACUTE, b"a" * 62 + E_GRAVE),  # 64 bytes, differing in the last byte
    (b"a" * 63 + E_ACUTE, b"a" * 63 + E_GRAVE),  # 65 bytes
    (b"a" * 300 + EURO, b"a" * 300 + E_ACUTE + b"x"),
]


@pytest.mark.parametrize(("a", "b"), PAIRS, ids=[f"{len(a)}-{len(b)}" for a, b in PAIRS])
async def test_two_clients_never_share_a_budget(gateway: Gateway, a: bytes, b: bytes) -> None:
    assert [await _status(gateway, a) for _ in range(3)] == [200, 200, 429]
    assert [await _status(gateway, b) for _ in range(3)] == [200, 200, 429]


async def test_a_websocket_upgrade_spends_the_budget_of_the_same_bytes(gateway: Gateway) -> None:
    """aiohttp decodes the upgrade's fields as UTF-8, the plain path as latin-1: the key is
    made from the bytes either way, so upgrades are no way around the limit."""
    token = b"Bearer " + EURO * 30  # non-ASCII and past 64 bytes
    short = b"k" + E_ACUTE  # non-ASCII and kept as it is
    for value in (token, short):
        assert [await _status(gateway, value) for _ in range(2)] == [200, 200]
        assert await _status(gateway, value, upgrade=True) == 429


async def test_explain_shows_the_key_and_budget_the_pipeline_spends(gateway: Gateway) -> None:
    token = "Bearer " + "\u20ac" * 30 + "z" * 300
    other = "Bearer " + "\u20ac" * 30 + "y" * 300
    for _ in range(2):
        assert await _status(gateway, token.encode()) == 200
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:
        answers = []
        for value in (token, other):
            params = {"ip": "127.0.0.1", "path": "/x", "header": f"Authorization:{value}"}
            async with s.get(admin_url(gateway, "/admin/explain"), params=params) as r:
                assert r.status == 200
                answers.append((await r.json())["policies"][0])
    spent, fresh = answers
    assert spent["key"] == "h#" + digest(credential_form(token.encode().decode("latin-1")))
    assert spent["would_allow"] is False
    assert fresh["key"] != spent["key"]
    assert fresh["would_allow"] is True


async def test_a_credential_spelled_otherwise_spends_the_same_budget(gateway: Gateway) -> None:
    """The scheme's case and the spaces after it do not matter to the server that reads
    Authorization, so they do not give a client another budget."""
    token = b"t" * 100
    spellings = [b"Bearer " + token, b"bearer " + token, b"BEARER   " + token]
    assert [await _status(gateway, v) for v in spellings] == [200, 200, 429]


async def test_a_tab_after_the_scheme_spends_the_same_budget(gateway: Gateway) -> None:
    """Servers that split Authorization on any whitespace (Django REST framework's
    ``split()``, most token middlewares) read ``Bearer<TAB>T`` as ``Bearer T``: each
    mix of tabs and spaces must not be another budget."""
    token = b"t" * 100
    spellings = [b"Bearer\t" + token, b"bearer \t " + token, b"Bearer\t\t" + token]
    assert [await _status(gateway, v) for v in spellings] == [200, 200, 429]


async def test_two_fields_of_the_keyed_header_are_refused(gateway: Gateway) -> None:
    """Which one is the client's? The upstream may read the other: refused, so a junk
    first field cannot buy a fresh budget for the real one."""
    assert gateway.proxy_port is not None
    for junk in (b"a", b"b", b"c"):
        head = (
            b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: "
            + junk
            + b"\r\nAuthorization: Bearer real\r\n\r\n"
        )
        answer = await raw_exchange(gateway.proxy_port, head, wait_s=0.5)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert b"more than one Authorization field" in answer
