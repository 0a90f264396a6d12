"""One canonical path for every decision (SPEC 9), over real sockets.

Routes, route guards, suspicious-path scoring and ``/admin/explain`` read the same
canonical path (``gateway/core/paths.py``); the upstream receives the target as sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.gw import admin_url, base_config, raw_exchange, running_gateway, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0ken"


class Recorder:
    """An upstream that records the raw target of each request (and each WebSocket)."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok")
        self.targets.append(request.raw_path)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        return web.Response(text="ok")


@pytest.fixture
async def rec() -> AsyncIterator[tuple[Recorder, str]]:
    r = Recorder()
    async with serve(r.app) as url_:
        yield r, url_


def _guarded(up_url: str, **kw: Any) -> dict[str, Any]:
    """`/admin/` open only to 10.0.0.0/8 (the tests connect from 127.0.0.1), the rest open."""
    return base_config(
        up_url,
        routes=[
            {"name": "admin", "path_prefix": "/admin/", "upstream": "api",
             "source_cidrs": ["10.0.0.0/8"]},
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
        **kw,
    )  # fmt: skip


def _get(target: str, *fields: str, close: bool = True) -> bytes:
    """A GET of ``target`` as raw bytes (asking for the connection to close after it)."""
    more = ["Connection: close"] if close else []
    lines = [f"GET {target} HTTP/1.1", "Host: h", *fields, *more, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


GUARD_SPELLINGS = [
    "/x/..;/admin/x",
    "/admin;x=1/x",
    "/x/..\\admin/x",
    "/x/..%5cadmin/x",
    "/x/..%5Cadmin/x",
    "/x/%2E%2e/admin/x",
    "/x/.%2e/admin/x",
    "/x%2f..%2fadmin/x",
    "/x/.;/../admin/x",
    "/x/..;jsessionid=0/admin/x",
    "/admin//x",
    "/../admin/x",
    "/%61dmin/x",
    "/ADMIN/x",
    "/Admin/x",
    "/admin./x",
    "/admin%20/x",
    "/admin.%20/x",
    "/admin",
    "/admin;x",
    "/admin/",
    "/x/..;/admin",
    "http://h/x/..;/admin/x",
    "/admin%3Bx=1/x",
    "/x/..%3b/admin/x",
    "/x/%2e%2e%3B/admin/x",
]


async def test_a_guarded_prefix_is_reached_in_no_spelling(rec: Any) -> None:
    """Each spelling that some upstream reads as /admin/... meets /admin/'s guard."""
    r, up_url = rec
    async with running_gateway(_guarded(up_url)) as gw:
        assert gw.proxy_port is not None
        answers = {
            target: await raw_exchange(gw.proxy_port, _get(target), wait_s=0.5)
            for target in GUARD_SPELLINGS
        }
        assert r.targets == []
        plain = await raw_exchange(gw.proxy_port, _get("/x/admin/"), wait_s=0.5)
        assert _status(plain) == 200
    passed = {t: a[:12] for t, a in answers.items() if _status(a) != 403}
    assert passed == {}
    assert r.targets == ["/x/admin/"]


async def test_a_websocket_upgrade_meets_the_guard_of_its_canonical_path(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(_guarded(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(
            gw.proxy_port,
            _get(
                "/x/..;/admin/ws",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                close=False,
            ),
            wait_s=0.5,
        )
    assert _status(answer) == 403, answer[:200]
    assert r.targets == []


HOSTILE_TARGETS = [
    "/a%00b",
    "/.env%00.txt",
    "/a%0d%0aX-Injected:1",
    "/a%zz",
    "/a%",
    "/a%4",
    "/a%u002e",
    "/x/%252e%252e/admin/x",
    "/x/%252fadmin",
    "/x/%25%32%65%25%32%65/admin/x",
    "/x/%c0%ae%c0%ae/admin/x",
    "/x/%ef%bc%8e%ef%bc%8e/admin/x",
    "/a%ffb",
    "/x#/../admin/x",
    "/x/%253b/admin/x",
    "/%EF%BD%81dmin/x",
    "/admin%C2%A0/x",
    "/admin%E3%80%80/x",
    "/ad%C4%B1min/x",
    "/%E2%84%AAey",
    "/%EF%AC%81le",
]


async def test_an_undecodable_or_hostile_target_is_400_and_reaches_nothing(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(_guarded(up_url)) as gw:
        assert gw.proxy_port is not None
        answers = {
            target: await raw_exchange(
                gw.proxy_port, _get(target, close=False) + _get("/next"), wait_s=0.5
            )
            for target in HOSTILE_TARGETS
        }
    assert {t: a[:12] for t, a in answers.items() if _status(a) != 400} == {}
    for answer in answers.values():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"\r\nContent-Type: application/problem+json" in head
        assert b"\r\nConnection: close" in head
        assert b'"status":400' in body.replace(b" ", b"")
    assert r.targets == []  # nor the request after it on the connection


SUSPICIOUS_SPELLINGS = [
    "/x//../.env",
    "/./.env",
    "/x/../.env",
    "/x/..;/.env",
    "/x/..%5c.env",
    "/%2eenv",
    "/%2Eenv",
    "/.env;x=1",
    "/.env.",
    "/.env%20",
    "/.ENV",
    "/.Env?x=1",
    "/.git//config",
    "/.GIT/config",
    "/x/..\\.git/HEAD",
    "/WP-ADMIN",
    "/wp-login.PHP",
    "/phpMyAdmin",
]


async def test_a_suspicious_path_is_scored_in_every_spelling(rec: Any) -> None:
    """Two probes (25 points each) reach ban_score 50: the second one is refused. Each
    spelling comes from a client address of its own (through a trusted proxy)."""
    r, up_url = rec
    cfg = base_config(up_url, abuse={"ban_score": 50}, trusted_proxies=["127.0.0.0/8"])
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        not_banned = {}
        for i, target in enumerate(SUSPICIOUS_SPELLINGS):
            xff = f"X-Forwarded-For: 203.0.113.{i}"
            first = await raw_exchange(gw.proxy_port, _get(target, xff), wait_s=0.5)
            second = await raw_exchange(gw.proxy_port, _get(target, xff), wait_s=0.5)
            assert _status(first) == 200, first[:100]
            if _status(second) != 403:
                not_banned[target] = second[:12]
    assert not_banned == {}
    assert len(r.targets) == len(SUSPICIOUS_SPELLINGS)


AUTHORITY_SPELLINGS = [
    "//h/admin/x",
    "///admin/x",
    "/\\h/admin/x",
    "/\\/h/admin/x",
    "//admin//x",
    "//admin",
    "http://h//h/admin/x",
]


async def test_a_target_starting_with_two_slashes_is_400(rec: Any) -> None:
    """WHATWG URL parsers (Node's ``new URL(req.url, base)``) and Python's ``urlsplit``
    read ``//h/admin/x`` as host ``h`` and path ``/admin/x`` (a backslash counts as a
    slash to WHATWG); merged, the slashes read ``/h/admin/x``. No one path: refused."""
    r, up_url = rec
    async with running_gateway(_guarded(up_url)) as gw:
        assert gw.proxy_port is not None
        answers = {
            target: await raw_exchange(gw.proxy_port, _get(target), wait_s=0.5)
            for target in AUTHORITY_SPELLINGS
        }
        ws = await raw_exchange(
            gw.proxy_port,
            _get(
                "//h/admin/ws",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                close=False,
            ),
            wait_s=0.5,
        )
    assert {t: a[:12] for t, a in answers.items() if _status(a) != 400} == {}
    assert _status(ws) == 400
    assert r.targets == []


async def test_a_probe_starting_with_two_slashes_is_still_scored(rec: Any) -> None:
    """``//.env`` is refused, and scored as the probe it is: the second one is banned."""
    r, up_url = rec
    cfg = base_config(up_url, abuse={"ban_score": 50}, trusted_proxies=["127.0.0.0/8"])
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        for i, target in enumerate(["//.env", "//.git/config", "/\\.env"]):
            xff = f"X-Forwarded-For: 203.0.113.{i}"
            first = await raw_exchange(gw.proxy_port, _get(target, xff), wait_s=0.5)
            second = await raw_exchange(gw.proxy_port, _get(target, xff), wait_s=0.5)
            assert (_status(first), _status(second)) == (400, 403), target
    assert r.targets == []


async def test_the_upstream_receives_the_target_exactly_as_sent(rec: Any) -> None:
    r, up_url = rec
    target = "/a/./b;p=1//c/%7e%41%2F..%2f/d.?q=/../x&r=%2e"
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(gw.proxy_port, _get(target), wait_s=0.5)
    assert _status(answer) == 200
    assert r.targets == [target]


async def test_explain_reads_the_path_as_the_pipeline_does(rec: Any) -> None:
    _, up_url = rec
    cfg = _guarded(up_url)
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async with running_gateway(cfg, env) as gw, aiohttp.ClientSession() as s:

        async def explain(path: str, method: str = "GET") -> dict[str, Any]:
            params = {"ip": "127.0.0.1", "path": path, "method": method}
            async with s.get(admin_url(gw, "/admin/explain"), params=params, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
                doc: dict[str, Any] = await resp.json()
                return doc

        guarded = await explain("/x/..;/admin/x")
        assert guarded["path"] == "/x/..;/admin/x"
        assert guarded["canonical_path"] == "/admin/x"
        assert guarded["route"] == "admin"
        assert guarded["verdict"].startswith("403")
        upper = await explain("/ADMIN/x")
        assert upper["route"] == "admin"
        probe = await explain("//.ENV")
        assert probe["suspicious_path"] is True
        assert probe["canonical_path"] == "/.ENV"
        assert probe["verdict"].startswith("400")  # a target starting with //
        bad = await explain("/a%00")
        assert bad["canonical_path"] is None
        assert bad["verdict"].startswith("400")
        trace = await explain("/x", "TRACE")
        assert trace["verdict"].startswith("405")
        assert gw.runtime.bans.score("127.0.0.1") == 0  # explaining counts nothing
