"""Hostile clients against the proxy and admin ports, over real sockets: each test is an
attack that once got through, kept so that it never does again."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web

from gateway.pipeline.handler import ProxyHandler
from tests.gw import base_config, raw_exchange, running_gateway, serve, url, wait_for
from tests.integration.test_overload import Held

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def held() -> AsyncIterator[tuple[Held, str]]:
    h = Held()
    async with serve(h.app) as url_:
        yield h, url_


async def test_a_refused_second_concurrency_key_leaks_no_slot_of_the_first(held: Any) -> None:
    """Two concurrency policies; the second's key field given twice is a 400 after the
    first's slot was taken: that slot must be given back, or a client could fill the
    route's budget for good with requests that never reach the upstream."""
    h, u = held
    cfg = base_config(
        u,
        rate_limit={
            "policies": {
                "route-inflight": {"max_inflight": 2, "key": "route"},
                "tenant-inflight": {"max_inflight": 5, "key": "header:X-Tenant"},
            }
        },
        routes=[
            {
                "name": "api",
                "path_prefix": "/",
                "upstream": "api",
                "rate_limits": ["route-inflight", "tenant-inflight"],
            }
        ],
    )
    async with running_gateway(cfg) as gw:
        port = gw.proxy_port or 0
        for _ in range(3):
            answer = await raw_exchange(
                port,
                b"GET /x HTTP/1.1\r\nHost: a\r\nX-Tenant: a\r\nX-Tenant: b\r\n"
                b"Connection: close\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 400 ")
        assert len(gw.runtime.inflight_keys) == 0
        h.go.set()
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
            assert r.status == 200


ADMIN_TOKEN = "att4ck-admin-token-5f2b"


def _fields(reply: bytes) -> tuple[int, dict[str, str]]:
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(head[0].split(" ")[1]), fields


ADMIN_ANSWERS = [
    pytest.param(b"GET /admin/ui HTTP/1.1\r\nHost: a\r\n", 200, id="page"),
    pytest.param(b"GET /admin/ui/app.js HTTP/1.1\r\nHost: a\r\n", 200, id="script"),
    pytest.param(b"GET /admin/stats HTTP/1.1\r\nHost: a\r\n", 401, id="no-token"),
    pytest.param(
        b"GET /admin/stats HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer "
        + ADMIN_TOKEN.encode()
        + b"\r\n",
        200,
        id="stats",
    ),
    pytest.param(b"GET /nope HTTP/1.1\r\nHost: a\r\n", 404, id="not-found"),
    pytest.param(b"PUT /admin/ui HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n", 405, id="method"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: a\r\n", 200, id="metrics"),
    pytest.param(b"GET * HTTP/1.1\r\nHost: a\r\n", 400, id="parse-error"),
]


@pytest.mark.parametrize("security_headers", [{}, {"enabled": False}, {"override": True}])
@pytest.mark.parametrize(("request_", "status"), ADMIN_ANSWERS)
async def test_every_admin_answer_forbids_sniffing_framing_and_caching(
    security_headers: dict[str, Any], request_: bytes, status: int
) -> None:
    """The admin port's answers are the gateway's own: whatever ``security_headers`` says
    for the proxy port (off, or overriding), each one, errors included, is no-sniff,
    unframeable, uncached and names no server software; and the operator page keeps the
    CSP it needs to run (its own script and style), never one that blocks it."""
    async with (
        serve(web.Application()) as u,
        running_gateway(
            base_config(u, security_headers=security_headers), {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
        ) as gw,
    ):
        reply = await raw_exchange(
            gw.admin_port or 0, request_ + b"Connection: close\r\n\r\n", wait_s=2
        )
    got, fields = _fields(reply)
    assert got == status, reply[:300]
    assert fields.get("x-content-type-options") == "nosniff"
    assert "frame-ancestors 'none'" in fields.get("content-security-policy", "")
    assert fields.get("cache-control") == "no-store"
    assert "server" not in fields, fields
    if request_.startswith(b"GET /admin/ui"):
        assert "default-src 'self'" in fields["content-security-policy"]
    else:
        assert "default-src 'none'" in fields["content-security-policy"]


API_KEY = "key-of-team-a-0123456789"
HS_SECRET = "a-shared-secret-of-at-least-32-bytes!"


@pytest.fixture
async def echo_credentials() -> AsyncIterator[str]:
    """An upstream that answers with every Authorization and X-API-Key field it got."""

    async def handler(request: web.Request) -> web.Response:
        got = request.headers.getall("Authorization", []) + request.headers.getall("X-API-Key", [])
        return web.Response(text="|".join(got))

    async with serve(handler) as url_:
        yield url_


def _identity_config(upstream: str, tmp_path: Path) -> dict[str, Any]:
    keys = tmp_path / "keys.yaml"
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys.write_text(f"keys:\n  - {{id: team-a, sha256: {digest}}}\n")
    return base_config(
        upstream,
        identity={
            "jwt": {"hs256_secret_env": "JWT_SECRET"},
            "api_keys": {"file": str(keys)},
        },
        rate_limit={
            "policies": {
                "per-user": {"requests": 100, "period_s": 60, "key": "jwt:sub"},
                "per-tenant": {"requests": 100, "period_s": 60, "key": "jwt:tenant"},
            }
        },
        routes=[
            {"name": "me", "path_prefix": "/me", "upstream": "api", "auth": "jwt"},
            {"name": "keys", "path_prefix": "/keys", "upstream": "api", "auth": "api_key"},
            {"name": "either", "path_prefix": "/either", "upstream": "api", "auth": "any"},
            {
                "name": "api",
                "path_prefix": "/",
                "upstream": "api",
                "rate_limits": ["per-user", "per-tenant"],
            },
        ],
        abuse={"enabled": False},
    )


def _hs256(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, HS_SECRET, algorithm="HS256")


async def _raw_get(port: int, path: str, fields: list[tuple[str, str]]) -> tuple[int, bytes]:
    head = f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in fields)
    reply = await raw_exchange(port, head.encode("latin-1") + b"\r\n", wait_s=2)
    return int(reply.split(b" ", 2)[1]), reply.partition(b"\r\n\r\n")[2]


async def test_a_credential_field_given_twice_is_no_credential(
    echo_credentials: str, tmp_path: Path
) -> None:
    """The gateway would verify the first field and the upstream may read the other one
    (many servers take the last, or join them): a valid credential of one's own must not
    carry a forged one past ``auth``."""
    good = _hs256({"sub": "alice", "exp": int(time.time()) + 600})
    forged = jwt.encode({"sub": "admin", "exp": int(time.time()) + 600}, "x" * 32, "HS256")
    cfg = _identity_config(echo_credentials, tmp_path)
    async with running_gateway(cfg, {"JWT_SECRET": HS_SECRET}) as gw:
        port = gw.proxy_port or 0
        # each alone: as before
        assert (await _raw_get(port, "/me", [("Authorization", f"Bearer {good}")]))[0] == 200
        assert (await _raw_get(port, "/keys", [("X-API-Key", API_KEY)]))[0] == 200
        for path, fields in (
            ("/me", [("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {forged}")]),
            ("/keys", [("X-API-Key", API_KEY), ("X-API-Key", "team-b-anything")]),
        ):
            status, body = await _raw_get(port, path, fields)
            assert status == 401, body
            assert b"admin" not in body


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"sub": "bob", "exp": 10**400}, id="exp-beyond-float"),
        pytest.param({"sub": "\ud800", "exp": None}, id="sub-lone-surrogate"),
        pytest.param({"sub": "t", "tenant": {"a": ["\udfff"]}, "exp": None}, id="claim-surrogate"),
        pytest.param({"sub": "t", "tenant": 2**70, "exp": None}, id="claim-beyond-64-bits"),
        pytest.param({"sub": "line\nbreak\x00\x1b[31m", "exp": None}, id="sub-controls"),
        pytest.param({"sub": "s" * 6000, "exp": None}, id="sub-long"),
    ],
)
async def test_odd_claims_of_a_signed_token_are_never_a_500(
    echo_credentials: str,
    tmp_path: Path,
    claims: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Claims the signer put there, odd as they are (an issuer's bug, a leaked HS256
    secret): the request is answered (200 or 401), never a 5xx, and the access log line
    is one line of JSON."""
    if claims["exp"] is None:
        claims["exp"] = int(time.time()) + 600
    token = _hs256(claims)
    cfg = _identity_config(echo_credentials, tmp_path)
    cfg["access_log"] = {"sample_ratio": 1.0}
    async with running_gateway(cfg, {"JWT_SECRET": HS_SECRET}) as gw:
        port = gw.proxy_port or 0
        for path in ("/me", "/x"):
            status, body = await _raw_get(port, path, [("Authorization", f"Bearer {token}")])
            assert status in (200, 401), body[:300]
        gw.runtime.access_log.flush()
    lines = [x for x in capsys.readouterr().out.splitlines() if '"event":"access"' in x]
    assert len(lines) == 2, lines
    for line in lines:
        assert orjson.loads(line)["status"] in (200, 401)


async def test_a_token_with_bytes_that_are_not_utf8_on_an_upgrade_is_a_401(
    echo_credentials: str, tmp_path: Path
) -> None:
    """The WebSocket upgrade's fields are decoded as UTF-8 (undecodable bytes as lone
    surrogates): such a token is not a token, never a 500 with a traceback per request."""
    cfg = _identity_config(echo_credentials, tmp_path)
    async with running_gateway(cfg, {"JWT_SECRET": HS_SECRET}) as gw:
        reply = await raw_exchange(
            gw.proxy_port or 0,
            b"GET /me HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Authorization: Bearer a.\xff.b\r\n\r\n",
            wait_s=1,
        )
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]


async def _hostile_upstream(request: web.Request) -> web.StreamResponse:
    """/slow answers after 3 s; /reset sends half a body and drops the connection;
    /big streams 4 MiB; /ws refuses the upgrade; else 200 at once, the body read."""
    await request.read()
    if request.path == "/slow":
        await asyncio.sleep(3)
    if request.path == "/reset":
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        assert request.transport is not None
        request.transport.close()
        return resp
    if request.path == "/big":
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 65536)
        return resp
    if request.path == "/ws":
        return web.Response(status=403)
    return web.Response(text="ok")


async def _send_and_drop(port: int, data: bytes, wait_s: float = 0.3) -> None:
    """Send bytes, read a little (or nothing), and drop the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(100), wait_s)
    writer.transport.abort()


HOSTILE_EXCHANGES = [
    # a body cut short, then gone (buffered path and streamed path)
    b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nxxxxxxxxxx",
    b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 900000\r\n\r\n" + b"x" * 300000,
    # a chunked body that goes bad half-way, or grows past max_body_bytes
    b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nxxxxx\r\nzz\r\n",
    b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    + (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 40,
    # 100-continue, then nothing
    b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
    # gone while the upstream thinks; the upstream drops mid-answer; a client not reading
    b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n",
    # an upgrade the upstream refuses; a bad one; an error, then a pipelined request
    (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ),
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    (
        b"GET /ok HTTP/1.1\r\nHost: a\r\nX-Tenant: a\r\nX-Tenant: b\r\n\r\n"
        b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
    ),
]


async def test_no_hostile_exchange_leaves_anything_counted(tmp_path: Path) -> None:
    """Each way a client or an upstream can end an exchange badly: once they are over,
    nothing stays counted (upstream in flight, concurrency slots, buffered bytes)."""
    async with serve(_hostile_upstream) as u:
        cfg = base_config(
            u,
            upstreams={"api": {"url": u, "timeout_s": 1.5, "max_inflight": 50}},
            request={"buffer_body_bytes": 65536, "max_body_bytes": 1_000_000},
            rate_limit={
                "policies": {
                    "route-inflight": {"max_inflight": 40, "key": "route"},
                    "tenant-inflight": {"max_inflight": 40, "key": "header:X-Tenant"},
                }
            },
            routes=[
                {
                    "name": "api",
                    "path_prefix": "/",
                    "upstream": "api",
                    "rate_limits": ["route-inflight", "tenant-inflight"],
                }
            ],
            abuse={"enabled": False},
        )
        async with running_gateway(cfg) as gw:
            port = gw.proxy_port or 0
            await asyncio.gather(*(_send_and_drop(port, data) for data in HOSTILE_EXCHANGES))
            up = gw.runtime.upstreams["api"]
            server = gw._proxy_server  # what is counted is the point
            assert server is not None
            handler = server.handler
            assert isinstance(handler, ProxyHandler)
            leg = handler.leg

            def settled() -> bool:
                return (
                    up.inflight == 0
                    and up.critical_inflight == 0
                    and len(gw.runtime.inflight_keys) == 0
                    and leg.buffered == 0
                )

            assert await wait_for(settled, timeout=8), (
                up.inflight,
                dict(gw.runtime.inflight_keys._counts),
                leg.buffered,
            )
            async with aiohttp.ClientSession() as s, s.get(url(gw, "/ok")) as r:
                assert r.status == 200


CUT_SHORT = [
    pytest.param(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nxx", id="plain"),
    pytest.param(
        b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nxx",
        id="plain-chunked",
    ),
    pytest.param(
        b"POST /ok HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 100\r\n\r\nxx",
        id="upgrade-path",
    ),
    pytest.param(
        b"POST /ok HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Length: 900000\r\n\r\n" + b"x" * 200_000,
        id="upgrade-path-streamed",
    ),
]


@pytest.mark.parametrize("data", CUT_SHORT)
async def test_a_client_gone_mid_body_logs_no_error(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends half a body and goes is no error of the gateway's: no
    traceback for each such connection (a cheap way to flood the logs), no 5xx counted."""
    async with serve(_hostile_upstream) as u:
        cfg = base_config(u, request={"buffer_body_bytes": 65536})
        async with running_gateway(cfg) as gw:
            for _ in range(3):
                await _send_and_drop(gw.proxy_port or 0, data, wait_s=0.2)
            await asyncio.sleep(0.3)
            server_errors = sum(
                sample.value
                for family in gw.runtime.metrics.registry.collect()
                for sample in family.samples
                if sample.name == "gateway_requests_total" and sample.labels["code"].startswith("5")
            )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert server_errors == 0


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 38\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n26\r\n"],
    ids=["content-length", "chunked"],
)
async def test_a_websocket_handshake_with_a_body_is_refused(framing: bytes) -> None:
    """The body of a handshake was never sent on, but its Content-Length was: the
    upstream waited for bytes that never came (holding a connection until the timeout),
    or read the first WebSocket frames as that body. A handshake has no body: 400."""
    upgrades = 0

    async def ws_echo(request: web.Request) -> web.StreamResponse:
        nonlocal upgrades
        if request.path == "/health":
            return web.Response(text="ok")
        upgrades += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    async with serve(ws_echo) as u, running_gateway(base_config(u)) as gw:
        reply = await raw_exchange(
            gw.proxy_port or 0,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            + framing
            + b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            wait_s=1,
        )
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert upgrades == 0


async def test_on_auth_any_a_credential_that_does_not_verify_is_refused_beside_a_valid_one(
    echo_credentials: str, tmp_path: Path
) -> None:
    """``auth: any`` tells the upstream that one of the credentials was verified, not
    which: a forged token beside a valid API key of one's own (or a wrong key beside a
    valid token) must not reach it as if it had been."""
    good = _hs256({"sub": "alice", "exp": int(time.time()) + 600})
    forged = jwt.encode({"sub": "admin", "exp": int(time.time()) + 600}, "x" * 32, "HS256")
    cfg = _identity_config(echo_credentials, tmp_path)
    async with running_gateway(cfg, {"JWT_SECRET": HS_SECRET}) as gw:
        port = gw.proxy_port or 0
        for fields, status in (
            ([("X-API-Key", API_KEY)], 200),
            ([("Authorization", f"Bearer {good}")], 200),
            ([("Authorization", f"Bearer {good}"), ("X-API-Key", API_KEY)], 200),
            ([("X-API-Key", API_KEY), ("Authorization", f"Bearer {forged}")], 401),
            ([("Authorization", f"Bearer {good}"), ("X-API-Key", "not-a-key")], 401),
        ):
            got, body = await _raw_get(port, "/either", fields)
            assert got == status, (fields, body)
