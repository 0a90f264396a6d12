"""The proxy leg over real sockets: streaming, headers, limits, errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import free_port
from tests.gw import base_config, raw_exchange, running_gateway, url

pytestmark = pytest.mark.timeout(60)


class Upstream:
    """A real upstream that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.ws_opened = 0
        self.ws_sizes: list[int] = []  # sizes of the WebSocket messages that reached it
        self.app = web.Application(
            client_max_size=64 * 1024 * 1024, handler_args={"max_field_size": 65536}
        )
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok")
        if request.path == "/ws-flood":  # sends until the gateway goes away
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            with contextlib.suppress(ConnectionError):
                while not ws.closed:
                    await ws.send_bytes(b"f" * 1_000_000)
            return ws
        if request.path == "/ws-slow":  # a slow handshake
            await asyncio.sleep(0.3)
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        if request.path == "/ws-private":  # refuses upgrades without a login
            return web.Response(status=401, text="log in first")
        if request.path == "/ws":
            self.ws_opened += 1
            ws = web.WebSocketResponse(protocols=("chat",), max_msg_size=0)
            await ws.prepare(request)
            async for msg in ws:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self.ws_sizes.append(len(msg.data))
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data[::-1])
            return ws
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        self.seen.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": request.headers.copy(),
                "size": size,
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
            }
        )
        if request.path == "/slow":
            await asyncio.sleep(float(request.query.get("s", "2")))
        if request.path == "/stream":
            resp = web.StreamResponse(headers={"X-Upstream": "yes"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(f"part{i};".encode())
                await asyncio.sleep(0.01)
            await resp.write_eof()
            return resp
        if request.path == "/big":
            n = int(request.query.get("n", "1000000"))
            return web.Response(body=b"x" * n)
        if request.path == "/hop":
            return web.Response(
                text="hop",
                headers={
                    "Connection": "X-Secret-Hop",
                    "X-Secret-Hop": "1",
                    "Keep-Alive": "timeout=5",
                    "X-Powered-By": "php",
                    "Server": "upstream/1.0",
                    "X-Frame-Options": "SAMEORIGIN",
                },
            )
        if request.path == "/hop-plain":  # hop-by-hop fields, none named by Connection
            return web.Response(
                text="plain",
                headers={
                    "Keep-Alive": "timeout=5",
                    "Proxy-Authenticate": "Basic",
                    "Trailer": "X-Checksum",
                    "Upgrade": "h2c",
                    "X-Kept": "1",
                    "X-Frame-Options": "SAMEORIGIN",
                },
            )
        if request.path.startswith("/status/"):
            return web.Response(status=int(request.path.rsplit("/", 1)[1]), text="from upstream")
        return web.json_response({"ok": True, "size": size})


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, TestServer]]:
    up = Upstream()
    server = TestServer(up.app, host="127.0.0.1")
    await server.start_server()
    try:
        yield up, server
    finally:
        await server.close()


def _upgrade_request(path: str) -> bytes:
    """A valid WebSocket opening handshake for ``path``, as raw bytes."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()


def _url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_get_is_proxied_with_path_and_query_unchanged(upstream: Any) -> None:
    up, server = upstream
    async with (
        running_gateway(base_config(_url(server))) as gw,
        aiohttp.ClientSession() as s,
        s.get(url(gw, "/a%2Fb/c?x=1&y=%20z&x=2"), allow_redirects=False) as r,
    ):
        assert r.status == 200
        assert await r.json() == {"ok": True, "size": 0}
    assert up.seen[-1]["raw_path"] == "/a%2Fb/c?x=1&y=%20z&x=2"


async def test_request_id_is_kept_when_valid_and_replaced_when_not(upstream: Any) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/x"), headers={"X-Request-ID": "abc.DEF-123_4"}) as r:
            assert r.headers["X-Request-ID"] == "abc.DEF-123_4"
        assert up.seen[-1]["headers"]["X-Request-ID"] == "abc.DEF-123_4"
        async with s.get(url(gw, "/x"), headers={"X-Request-ID": "bad id!"}) as r:
            new = r.headers["X-Request-ID"]
            assert new != "bad id!"
            assert 1 <= len(new) <= 128
        assert up.seen[-1]["headers"]["X-Request-ID"] == new
        async with s.get(url(gw, "/x"), headers={"X-Request-ID": "a" * 129}) as r:
            assert r.headers["X-Request-ID"] != "a" * 129


async def test_large_body_streams_both_ways(upstream: Any) -> None:
    up, server = upstream
    body = b"y" * (8 * 1024 * 1024)
    async with running_gateway(base_config(_url(server))) as gw, aiohttp.ClientSession() as s:
        async with s.post(url(gw, "/upload"), data=io.BytesIO(body)) as r:
            assert r.status == 200
            assert (await r.json())["size"] == len(body)
        assert up.seen[-1]["size"] == len(body)
        assert up.seen[-1]["headers"]["Content-Length"] == str(len(body))
        async with s.get(url(gw, "/big?n=20000000")) as r:
            assert r.headers["Content-Length"] == "20000000"
            total = 0
            async for chunk in r.content.iter_any():
                total += len(chunk)
            assert total == 20_000_000


async def test_chunked_request_body_is_streamed(upstream: Any) -> None:
    up, server = upstream

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"z" * 1000
            await asyncio.sleep(0.01)

    async with (
        running_gateway(base_config(_url(server))) as gw,
        aiohttp.ClientSession() as s,
        s.post(url(gw, "/chunked"), data=gen()) as r,
    ):
        assert r.status == 200
        assert (await r.json())["size"] == 10_000
    assert up.seen[-1]["size"] == 10_000


async def test_streamed_response_arrives_in_parts_with_headers(upstream: Any) -> None:
    _, server = upstream
    async with (
        running_gateway(base_config(_url(server))) as gw,
        aiohttp.ClientSession() as s,
        s.get(url(gw, "/stream")) as r,
    ):
        assert r.headers["X-Upstream"] == "yes"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert "X-Request-ID" in r.headers
        assert await r.text() == "part0;part1;part2;part3;part4;"


async def test_body_over_limit_is_413_by_content_length_and_by_chunks(upstream: Any) -> None:
    up, server = upstream
    cfg = base_config(_url(server), request={"max_body_bytes": 1000})
    async with running_gateway(cfg) as gw:
        async with aiohttp.ClientSession() as s, s.post(url(gw, "/up"), data=b"a" * 1001) as r:
            assert r.status == 413
            assert r.headers["Content-Type"] == "application/problem+json"
            doc = await r.json(content_type=None)
            assert doc["status"] == 413
            assert doc["request_id"] == r.headers["X-Request-ID"]
        assert not any(s["raw_path"] == "/up" for s in up.seen)

        async def gen() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield b"b" * 100

        async with aiohttp.ClientSession() as s, s.post(url(gw, "/chunks"), data=gen()) as r:
            assert r.status == 413


async def test_headers_over_limit_get_431_and_12000_bytes_pass(upstream: Any) -> None:
    _, server = upstream
    async with running_gateway(base_config(_url(server))) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/h"), headers={"X-Big": "v" * 12000}) as r:
            assert r.status == 200
        async with s.get(url(gw, "/h"), headers={"X-Big": "v" * 17000}) as r:
            assert r.status == 431
            assert r.headers["Content-Type"] == "application/problem+json"
        many = {f"X-H{i}": "v" * 1000 for i in range(17)}
        async with s.get(url(gw, "/h"), headers=many) as r:
            assert r.status == 431


async def test_slow_request_head_gets_408(upstream: Any) -> None:
    _, server = upstream
    cfg = base_config(_url(server), request={"client_timeout_s": 0.5})
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 408")
        assert b"application/problem+json" in data
        assert b"\r\nX-Request-ID: " in data


async def test_hop_by_hop_headers_are_dropped_both_ways(upstream: Any) -> None:
    up, server = upstream
    async with (
        running_gateway(base_config(_url(server))) as gw,
        aiohttp.ClientSession() as s,
        s.get(
            url(gw, "/hop"),
            headers={
                "Connection": "keep-alive, X-Client-Hop",
                "X-Client-Hop": "secret",
                "Proxy-Authorization": "Basic abc",
                "TE": "trailers",
                "X-Kept": "1",
            },
        ) as r,
    ):
        assert r.status == 200
        assert "X-Secret-Hop" not in r.headers
        assert "Keep-Alive" not in r.headers
        assert "X-Powered-By" not in r.headers
        assert "Server" not in r.headers
        # override: false keeps the upstream's own value
        assert r.headers["X-Frame-Options"] == "SAMEORIGIN"
    seen = up.seen[-1]["headers"]
    assert "X-Client-Hop" not in seen
    assert "Proxy-Authorization" not in seen
    assert "TE" not in seen
    assert seen["X-Kept"] == "1"


async def test_forwarded_headers_from_untrusted_peer_are_replaced(upstream: Any) -> None:
    up, server = upstream
    async with (
        running_gateway(base_config(_url(server))) as gw,
        aiohttp.ClientSession() as s,
        s.get(
            url(gw, "/f"),
            headers={
                "X-Forwarded-For": "1.2.3.4",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "evil.example",
                "X-Real-IP": "1.2.3.4",
                "Host": "api.example",
            },
        ) as r,
    ):
        assert r.status == 200
        assert "Strict-Transport-Security" not in r.headers
    h = up.seen[-1]["headers"]
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["X-Real-IP"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == "api.example"
    assert h["Host"] == "api.example"


async def test_a_request_without_host_gets_the_upstreams_and_each_field_once(
    upstream: Any,
) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(gw.proxy_port, b"GET /f HTTP/1.0\r\nX-Kept: 1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")
    h = up.seen[-1]["headers"]
    assert h["Host"] == server.host + ":" + str(server.port)
    assert "X-Forwarded-Host" not in h  # the client named no host
    assert h["X-Kept"] == "1"
    for name in ("Host", "X-Forwarded-For", "X-Forwarded-Proto", "X-Real-IP", "X-Request-ID"):
        assert len(h.getall(name)) == 1, name
    assert h["X-Forwarded-For"] == h["X-Real-IP"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"


@pytest.mark.parametrize(
    ("fields", "chain"),
    [
        (
            ["X-Forwarded-For: 10.1.2.3", "X-Forwarded-For: 203.0.113.9"],
            "203.0.113.9, 127.0.0.1",
        ),
        (["Forwarded: for=10.1.2.3", "Forwarded: for=203.0.113.9"], "203.0.113.9, 127.0.0.1"),
    ],
    ids=["x-forwarded-for", "forwarded"],
)
async def test_several_forwarding_fields_are_one_list(
    upstream: Any, fields: list[str], chain: str
) -> None:
    """A trusted proxy that adds its own field line (HAProxy's option forwardfor does)
    must not leave the client's forged first line in charge of the client address."""
    up, server = upstream
    cfg = base_config(
        _url(server),
        trusted_proxies=["127.0.0.0/8"],
        routes=[
            {"name": "internal", "path_prefix": "/internal/", "upstream": "api",
             "source_cidrs": ["10.0.0.0/8"]},
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
    )  # fmt: skip
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        lines = "\r\n".join(fields)
        forged = await raw_exchange(
            gw.proxy_port, f"GET /internal/x HTTP/1.1\r\nHost: x\r\n{lines}\r\n\r\n".encode()
        )
        assert forged.startswith(b"HTTP/1.1 403 "), "the forged 10.x address was believed"
        answer = await raw_exchange(
            gw.proxy_port, f"GET /f HTTP/1.1\r\nHost: x\r\n{lines}\r\n\r\n".encode()
        )
    assert answer.startswith(b"HTTP/1.1 200 ")
    h = up.seen[-1]["headers"]
    assert h["X-Real-IP"] == "203.0.113.9"
    assert h["X-Forwarded-For"] == chain


async def test_a_trailer_without_end_is_refused_before_it_grows(upstream: Any) -> None:
    """Trailer fields are gathered by the parser before the gateway sees them: what a
    chunked body carries besides its data is bounded, and the request is refused."""
    _, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(
            b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: "
        )
        piece = b"a" * 16384
        with contextlib.suppress(ConnectionError, TimeoutError):
            for _ in range(128):  # 2 MiB of one trailer field, never ended
                writer.write(piece)
                await asyncio.wait_for(writer.drain(), 2)
        # without the bound the answer would wait for the body's end (client_timeout_s)
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert b"trailer" in answer


@pytest.mark.parametrize("size", [5, 300_000], ids=["held", "streamed"])
async def test_trailer_fields_never_reach_the_upstream_as_header_fields(
    upstream: Any, size: int
) -> None:
    """A request's trailer fields come after every check made on its head (credentials,
    rules, the fields the gateway sets): were they passed on among the head's fields, a
    client would hand the upstream fields the gateway never saw. They are dropped."""
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        body = b"x" * size
        raw = await raw_exchange(
            gw.proxy_port,
            b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"\r\n%x\r\n%b\r\n0\r\nAuthorization: Bearer forged\r\nX-Trailed: 1\r\n"
            b"X-Real-IP: 6.6.6.6\r\n\r\n" % (len(body), body),
        )
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:80]
    seen = up.seen[-1]
    assert seen["size"] == size
    assert "Authorization" not in seen["headers"]
    assert "X-Trailed" not in seen["headers"]
    assert seen["headers"].getall("X-Real-IP") == ["127.0.0.1"]


async def test_connection_cannot_strip_the_body_length(upstream: Any) -> None:
    """``Connection: Content-Length`` must not drop the field that frames the body sent
    upstream: without it the upstream would read the body as its next request."""
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        body = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        head = (
            f"POST /p HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        first = await raw_exchange(gw.proxy_port, head + body)
        second = await raw_exchange(gw.proxy_port, b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 200 ")
    paths = [seen["raw_path"] for seen in up.seen]
    assert "/smuggled" not in paths
    assert paths[-2:] == ["/p", "/after"]
    assert up.seen[-2]["headers"]["Content-Length"] == str(len(body))
    assert up.seen[-2]["size"] == len(body)


async def test_client_ip_behind_trusted_proxy_is_rightmost_untrusted(upstream: Any) -> None:
    up, server = upstream
    cfg = base_config(_url(server), trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])
    async with (
        running_gateway(cfg) as gw,
        aiohttp.ClientSession() as s,
        s.get(
            url(gw, "/f"),
            headers={
                "X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.1.2.3",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "public.example",
            },
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    h = up.seen[-1]["headers"]
    assert h["X-Real-IP"] == "203.0.113.9"
    # the forged left part is dropped: the client, the trusted hops, the peer
    assert h["X-Forwarded-For"] == "203.0.113.9, 10.1.2.3, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "https"
    assert h["X-Forwarded-Host"] == "public.example"


async def test_routes_first_match_404_and_405_with_allow(upstream: Any) -> None:
    _, server = upstream
    cfg = base_config(
        _url(server),
        routes=[
            {"name": "hook", "path_prefix": "/bot/", "upstream": "api", "methods": ["POST"]},
            {"name": "api", "path_prefix": "/api/", "upstream": "api"},
        ],
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/bot/x")) as r:
            assert r.status == 405
            assert r.headers["Allow"] == "POST"
            assert (await r.json(content_type=None))["status"] == 405
        async with s.post(url(gw, "/bot/x"), data=b"{}") as r:
            assert r.status == 200
        async with s.get(url(gw, "/nothing")) as r:
            assert r.status == 404
            assert r.headers["Content-Type"] == "application/problem+json"
            doc = await r.json(content_type=None)
            assert set(doc) >= {"type", "title", "status", "detail", "request_id"}
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        async with s.get(url(gw, "/api/ok")) as r:
            assert r.status == 200


async def test_upstream_down_is_502_and_slow_is_504(upstream: Any) -> None:
    _, server = upstream
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = base_config(
        _url(server),
        upstreams={
            "api": {"url": _url(server), "timeout_s": 0.5},
            "dead": {"url": dead, "retries": {"attempts": 1}},
        },
        routes=[
            {"name": "dead", "path_prefix": "/dead/", "upstream": "dead"},
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
    )
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/dead/x")) as r:
            assert r.status == 502
            assert r.headers["Content-Type"] == "application/problem+json"
        async with s.get(url(gw, "/slow?s=2")) as r:
            assert r.status == 504


async def test_upstream_error_statuses_pass_through_unchanged(upstream: Any) -> None:
    _, server = upstream
    async with running_gateway(base_config(_url(server))) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/status/503")) as r:
            assert r.status == 503
            assert await r.text() == "from upstream"
        async with s.get(url(gw, "/status/418")) as r:
            assert r.status == 418


async def test_websocket_is_proxied(upstream: Any) -> None:
    _, server = upstream
    async with (
        running_gateway(base_config(_url(server))) as gw,
        aiohttp.ClientSession() as s,
        s.ws_connect(url(gw, "/ws"), protocols=("chat",)) as ws,
    ):
        assert ws.protocol == "chat"
        await ws.send_str("hi")
        assert (await ws.receive_str(timeout=5)) == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive_bytes(timeout=5)) == b"cba"


async def test_a_refused_websocket_upgrade_gets_a_problem_and_the_connection_closes(
    upstream: Any,
) -> None:
    """A refusal on the upgrade protocol's path (its server takes real upgrades) is the
    same problem+json answer as on the plain path, and the connection closes after it."""
    _, server = upstream
    cfg = base_config(_url(server))
    cfg["routes"] = [{"name": "api", "path_prefix": "/api/", "upstream": "api"}]
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(_upgrade_request("/nowhere"))
        answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: the gateway closes
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert b"\r\nContent-Type: application/problem+json" in head
    assert b"\r\nX-Frame-Options: DENY" in head
    assert b"\r\nX-Request-ID: " in head
    assert b'"status":404' in body
    assert b"no route matches this path" in body


async def test_a_rate_limited_websocket_upgrade_gets_the_429_fields(upstream: Any) -> None:
    _, server = upstream
    cfg = base_config(
        _url(server),
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["p"]}],
        rate_limit={"policies": {"p": {"requests": 1, "period_s": 60, "burst": 1}}},
    )
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        async with aiohttp.ClientSession() as s, s.get(url(gw, "/x")) as r:
            assert r.status == 200  # the one request of the budget
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.write(_upgrade_request("/ws"))
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 ")
    fields = dict(
        line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line
    )
    assert fields["Content-Type"] == "application/problem+json"
    assert 1 <= int(fields["Retry-After"]) <= 60
    assert fields["RateLimit-Policy"] == '"p";q=1;w=60'
    assert fields["RateLimit"].startswith('"p";r=0;t=')
    assert b"quota-exceeded" in body


async def test_allowed_hosts(upstream: Any) -> None:
    _, server = upstream
    cfg = base_config(_url(server), allowed_hosts=["api.example"])
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/x"), headers={"Host": "api.example:8000"}) as r:
            assert r.status == 200
        async with s.get(url(gw, "/x"), headers={"Host": "other.example"}) as r:
            assert r.status == 400


# ----------------------------------------------------------------- hostile framing


def _req(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


SMUGGLING = [
    pytest.param(
        _req("POST /a HTTP/1.1", "Host: x", "Content-Length: 6", "Transfer-Encoding: chunked")
        + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        id="CL.TE",
    ),
    pytest.param(
        _req("POST /a HTTP/1.1", "Host: x", "Content-Length: 4", "Content-Length: 40")
        + b"abcdGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        id="two-content-lengths",
    ),
    pytest.param(
        _req("POST /a HTTP/1.1", "Host: x", "Transfer-Encoding : chunked")
        + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        id="TE-space-before-colon",
    ),
    pytest.param(
        _req("POST /a HTTP/1.1", "Host: x", "Transfer-Encoding: xchunked", "Content-Length: 5")
        + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        id="TE-obfuscated",
    ),
    pytest.param(
        _req(
            "POST /a HTTP/1.1",
            "Host: x",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: identity",
        )
        + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        id="TE.TE",
    ),
    pytest.param(
        _req("POST /a HTTP/1.1", "Host: x", "Transfer-Encoding: chunked")
        + b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        id="oversized-chunk-size",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        id="bare-CR-in-header",
    ),
    pytest.param(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        id="NUL-in-header",
    ),
]


@pytest.mark.parametrize("payload", SMUGGLING)
async def test_smuggling_never_reaches_upstream_as_second_request(
    upstream: Any, payload: bytes
) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        data = await raw_exchange(gw.proxy_port, payload, wait_s=1.0)
    assert not any("smuggled" in s["raw_path"] for s in up.seen), up.seen
    status_lines = [ln for ln in data.split(b"\r\n") if ln.startswith(b"HTTP/1.")]
    # answered with a 4xx, or one normalised request; never a response to /smuggled
    assert status_lines, data
    assert status_lines[0][9:10] in (b"2", b"4"), status_lines
    assert len(up.seen) <= 1
    assert b"\r\nX-Request-ID: " in data  # parser-level answers carry one too


async def test_absolute_form_target_goes_to_the_configured_upstream(upstream: Any) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        data = await raw_exchange(
            gw.proxy_port,
            _req(
                "GET http://169.254.169.254/latest/meta-data?x=1 HTTP/1.1",
                "Host: 169.254.169.254",  # another host is refused (test_framing.py)
                "Connection: close",
            ),
        )
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert up.seen[-1]["raw_path"] == "/latest/meta-data?x=1"


async def test_connect_is_refused(upstream: Any) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        data = await raw_exchange(
            gw.proxy_port, _req("CONNECT 169.254.169.254:443 HTTP/1.1", "Host: 169.254.169.254:443")
        )
    assert data[9:12] in (b"400", b"405"), data[:100]
    assert up.seen == []


async def test_rfc7239_forwarded_is_believed_from_trusted_proxies_only(upstream: Any) -> None:
    up, server = upstream
    fwd = 'for=6.6.6.6, for="[2001:db8::7]:4711";proto=https;host=pub.example, for=10.1.2.3'
    cfg = base_config(_url(server), trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/f"), headers={"Forwarded": fwd}) as r:
            assert r.status == 200
            assert "Strict-Transport-Security" in r.headers
        h = up.seen[-1]["headers"]
        assert h["X-Real-IP"] == "2001:db8::7"
        assert h["X-Forwarded-For"] == "2001:db8::7, 10.1.2.3, 127.0.0.1"
        assert h["X-Forwarded-Proto"] == "https"
        assert h["X-Forwarded-Host"] == "pub.example"
        assert "Forwarded" not in h
    async with running_gateway(base_config(_url(server))) as gw, aiohttp.ClientSession() as s:
        async with s.get(url(gw, "/f"), headers={"Forwarded": fwd}) as r:
            assert "Strict-Transport-Security" not in r.headers
        h = up.seen[-1]["headers"]
        assert h["X-Real-IP"] == "127.0.0.1"
        assert "Forwarded" not in h


async def test_head_is_answered_with_the_upstream_length_and_no_body(upstream: Any) -> None:
    """A HEAD answer announces a length but has no body: nobody waits for one."""
    _, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        t0 = asyncio.get_running_loop().time()
        raw = await raw_exchange(
            gw.proxy_port or 0,
            b"HEAD /big?n=5000 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /big?n=3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            wait_s=3,
        )
        took = asyncio.get_running_loop().time() - t0
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: 5000" in head.split(b"\r\n")
    assert rest.startswith(b"HTTP/1.1 200 ")  # the next answer follows at once: no body
    assert rest.endswith(b"\r\n\r\nxxx")
    assert took < 2


async def test_hop_by_hop_fields_of_an_answer_are_dropped_without_connection_tokens(
    upstream: Any,
) -> None:
    _, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        raw = await raw_exchange(
            gw.proxy_port or 0, b"GET /hop-plain HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
    head, _, body = raw.partition(b"\r\n\r\n")
    names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
    assert body == b"plain"
    for hop in (b"keep-alive", b"proxy-authenticate", b"trailer", b"upgrade"):
        assert hop not in names
    assert names.count(b"content-length") == 1
    assert names.count(b"x-frame-options") == 1  # the upstream's, kept (override: false)
    assert b"X-Frame-Options: SAMEORIGIN" in head.split(b"\r\n")
    assert b"x-kept" in names
    assert b"x-request-id" in names


async def test_an_upstream_answer_ended_by_the_close_reaches_the_client_whole() -> None:
    """An upstream that frames its body by closing (HTTP/1.0 style, no Content-Length):
    the client gets the whole body, chunked (HTTP/1.1) or delimited by the close (1.0)."""
    body = b"x" * 100_000

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await r.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /health"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            else:
                w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
            await w.drain()
        w.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_gateway(base_config(f"http://127.0.0.1:{port}")) as gw:
            async with aiohttp.ClientSession() as s, s.get(url(gw, "/file")) as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/plain"
                assert await r.read() == body
            assert gw.proxy_port is not None
            data = await raw_exchange(
                gw.proxy_port, b"GET /file HTTP/1.0\r\nHost: t\r\n\r\n", wait_s=2.0
            )
            assert data.startswith(b"HTTP/1.1 200 ")
            assert data.endswith(b"\r\n\r\n" + body)
    finally:
        server.close()


async def test_a_websocket_message_is_bounded_like_a_body(upstream: Any) -> None:
    """A message over max_body_bytes closes the WebSocket with 1009 and never reaches the
    upstream; the gateway offers no compression (no inflating a small frame into a big
    message)."""
    up, server = upstream
    cfg = base_config(_url(server), request={"max_body_bytes": 100_000})
    async with (
        running_gateway(cfg) as gw,
        aiohttp.ClientSession() as s,
        s.ws_connect(url(gw, "/ws"), compress=15) as ws,
    ):
        assert ws.compress == 0  # permessage-deflate was not accepted
        await ws.send_bytes(b"a" * 100_000)
        assert (await ws.receive_bytes(timeout=5)) == b"a" * 100_000
        await ws.send_bytes(b"b" * 100_001)
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert up.ws_sizes == [100_000]


async def test_a_bad_websocket_handshake_is_refused_before_the_upstream_is_asked(
    upstream: Any,
) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        for version, key in ((b"99", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"13", b"c2hvcnQ=")):
            answer = await raw_exchange(
                gw.proxy_port,
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: "
                + version
                + b"\r\nSec-WebSocket-Key: "
                + key
                + b"\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
            assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer
            assert b"application/problem+json" in answer
            assert b"not a valid WebSocket handshake" in answer
    assert up.ws_opened == 0


async def test_websockets_past_the_pool_size_are_refused_at_once_and_leave_the_breaker_closed(
    upstream: Any,
) -> None:
    """One client holding every upstream connection with idle WebSockets: the next
    upgrade is a 503 at once (no wait for a connection that would time out and count
    against the breaker), and plain requests still pass."""
    _, server = upstream
    cfg = base_config(_url(server))
    cfg["upstreams"]["api"]["max_connections"] = 2
    cfg["upstreams"]["api"]["connect_timeout_s"] = 0.2
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        held = [await s.ws_connect(url(gw, "/ws")) for _ in range(2)]
        for _ in range(6):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(url(gw, "/ws"))
            assert info.value.status == 503
        async with s.get(url(gw, "/plain")) as r:
            assert r.status == 200
        await held[0].close()
        again = await s.ws_connect(url(gw, "/ws"))  # a slot is free again
        await again.send_str("x")
        assert (await again.receive_str(timeout=5)) == "echo:x"
        for ws in (again, held[1]):
            await ws.close()


async def test_the_drain_ends_although_a_websocket_client_reads_nothing(upstream: Any) -> None:
    """The upstream floods a WebSocket whose client has stopped reading: closing it
    cannot be sent, so its connection is dropped and the drain still ends in time."""
    _, server = upstream
    cm = running_gateway(base_config(_url(server)))
    gw = await cm.__aenter__()
    drained = False
    try:
        assert gw.proxy_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 4096
        )
        writer.write(_upgrade_request("/ws-flood"))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
        cast("asyncio.Transport", writer.transport).pause_reading()  # reads nothing more
        await asyncio.sleep(0.5)  # the gateway's send buffer toward it fills up
        await asyncio.wait_for(cm.__aexit__(None, None, None), 8)  # drain.timeout_s is 2
        drained = True
        writer.transport.abort()
    finally:
        if not drained:
            await cm.__aexit__(None, None, None)


async def test_an_upstream_refusing_upgrades_is_no_failure_of_the_breaker(upstream: Any) -> None:
    """An upstream that answers an upgrade with 401 has answered: five refused upgrades
    do not open the breaker for everyone's requests."""
    _, server = upstream
    cfg = base_config(_url(server))
    cfg["upstreams"]["api"]["circuit_breaker"] = {"consecutive_failures": 3}
    async with running_gateway(cfg) as gw, aiohttp.ClientSession() as s:
        for _ in range(5):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(url(gw, "/ws-private"))
            assert info.value.status == 502
        async with s.get(url(gw, "/plain")) as r:
            assert r.status == 200
        now = asyncio.get_running_loop().time()
        assert gw.runtime.upstreams["api"].breaker.state(now) == "closed"


async def test_a_client_gone_during_the_upstream_handshake_is_no_error(upstream: Any) -> None:
    """The client leaves while the upstream's handshake is slow: counted as 499, no 500,
    no traceback, and nothing scored against the connection's peer (behind a trusted
    proxy, the proxy)."""
    _, server = upstream
    async with running_gateway(base_config(_url(server))) as gw:
        assert gw.proxy_port is not None
        for _ in range(3):
            _reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
            writer.write(_upgrade_request("/ws-slow"))
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.transport.abort()
        await asyncio.sleep(0.5)  # the upstream's handshakes end meanwhile
        m = gw.runtime.metrics.registry.get_sample_value
        codes = {"route": "api", "method": "GET"}
        assert m("gateway_requests_total", {**codes, "code": "499"}) == 3
        assert (
            m("gateway_requests_total", {"route": "none", "method": "OTHER", "code": "500"}) is None
        )
        assert gw.runtime.bans.score("127.0.0.1") == 0
