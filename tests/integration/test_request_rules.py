"""Request rules of SPEC 9 over raw sockets: methods, field names, the kept version-1 rules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.pipeline.snapshot import ALLOW_ANY
from tests.gw import admin_url, base_config, raw_exchange, running_gateway, serve

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """An upstream that records the method, raw target and raw field names it receives."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, list[tuple[str, str]]]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response(text="ok")
        fields = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers]
        self.seen.append((request.method, request.raw_path, fields))
        if request.headers.get("Upgrade", "").lower() == "websocket":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close()
            return ws
        return web.Response(text="ok")

    def fields(self, index: int = -1) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in self.seen[index][2]:
            out.setdefault(name.lower(), []).append(value)
        return out


@pytest.fixture
async def rec() -> AsyncIterator[tuple[Recorder, str]]:
    r = Recorder()
    async with serve(r.app) as url_:
        yield r, url_


def _request(method: str, target: str, *fields: str, close: bool = True) -> bytes:
    more = ["Connection: close"] if close else []
    lines = [f"{method} {target} HTTP/1.1", "Host: h", *fields, *more, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


def _field(answer: bytes, name: str) -> str | None:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    return None


# ------------------------------------------------------------------------------ TRACE


async def test_trace_is_405_unless_a_route_lists_it(rec: Any) -> None:
    r, up_url = rec
    cfg = base_config(
        up_url,
        routes=[
            {"name": "debug", "path_prefix": "/debug/", "upstream": "api",
             "methods": ["GET", "TRACE"]},
            {"name": "get", "path_prefix": "/get/", "upstream": "api", "methods": ["GET"]},
            {"name": "any", "path_prefix": "/", "upstream": "api"},
        ],
    )  # fmt: skip
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        port = gw.proxy_port
        any_route = await raw_exchange(port, _request("TRACE", "/x", "Authorization: secret"))
        get_route = await raw_exchange(port, _request("TRACE", "/get/x"))
        listed = await raw_exchange(port, _request("TRACE", "/debug/x"))
        get_any = await raw_exchange(port, _request("GET", "/x"))
    assert _status(any_route) == 405
    assert _field(any_route, "Allow") == ALLOW_ANY
    assert "TRACE" not in ALLOW_ANY
    assert _field(any_route, "Content-Type") == "application/problem+json"
    assert _status(get_route) == 405
    assert _field(get_route, "Allow") == "GET"
    assert _status(listed) == 200
    assert _status(get_any) == 200
    assert [(m, t) for m, t, _ in r.seen] == [("TRACE", "/debug/x"), ("GET", "/x")]


# ------------------------------------------------------------------ kept from version 1


async def test_connect_is_405(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(
            gw.proxy_port, _request("CONNECT", "169.254.169.254:443", close=False)
        )
    assert _status(answer) == 405
    assert _field(answer, "Allow") == ALLOW_ANY
    assert r.seen == []


async def test_obs_fold_in_a_request_head_is_400(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        folded = await raw_exchange(gw.proxy_port, _request("GET", "/a", "X-A: a", " b"))
        tab = await raw_exchange(gw.proxy_port, _request("GET", "/b", "X-A: a", "\tb"))
    assert _status(folded) == 400
    assert _status(tab) == 400
    assert r.seen == []


@pytest.mark.parametrize("method", ["get", "trace", "post", "Get", "connect", "options"])
async def test_lowercase_spellings_of_standard_methods_are_400(rec: Any, method: str) -> None:
    r, up_url = rec
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(gw.proxy_port, _request(method, "/x"))
    assert _status(answer) == 400
    assert r.seen == []


async def test_x_real_ip_carries_the_client_ip_upstream(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(
            gw.proxy_port, _request("GET", "/x", "X-Real-IP: 6.6.6.6", "X-Real-Ip: 6.6.6.7")
        )
    assert _status(answer) == 200
    assert r.fields()["x-real-ip"] == ["127.0.0.1"]


# ------------------------------------------------------------ field names with "_"

ALIASES = [
    "X_Forwarded_For: 6.6.6.6",
    "x_forwarded_for: 6.6.6.7",
    "X-Forwarded_For: 6.6.6.8",
    "X_REAL_IP: 6.6.6.9",
    "X_Real_Ip: 6.6.6.10",
    "X_Forwarded_Proto: https",
    "X_Forwarded_Host: evil.test",
    "X_Request_ID: forged",
    "Transfer_Encoding: chunked",
    "X_Custom: kept-only-when-allowed",
]


def _underscored(fields: dict[str, list[str]]) -> list[str]:
    return [name for name in fields if "_" in name]


async def test_field_names_with_underscores_are_dropped_by_default(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(gw.proxy_port, _request("GET", "/x", *ALIASES))
    assert _status(answer) == 200
    fields = r.fields()
    assert _underscored(fields) == []
    assert fields["x-forwarded-for"] == ["127.0.0.1"]
    assert fields["x-real-ip"] == ["127.0.0.1"]
    assert fields["x-forwarded-proto"] == ["http"]


async def test_allow_passes_underscores_but_never_an_alias_of_a_field_the_gateway_sets(
    rec: Any,
) -> None:
    r, up_url = rec
    cfg = base_config(up_url, request={"headers_with_underscores": "allow"})
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(gw.proxy_port, _request("GET", "/x", *ALIASES))
    assert _status(answer) == 200
    fields = r.fields()
    assert _underscored(fields) == ["x_custom"]
    assert fields["x-forwarded-for"] == ["127.0.0.1"]


async def test_reject_answers_400_and_the_upstream_sees_nothing(rec: Any) -> None:
    r, up_url = rec
    cfg = base_config(up_url, request={"headers_with_underscores": "reject"})
    async with running_gateway(cfg) as gw:
        assert gw.proxy_port is not None
        port = gw.proxy_port
        refused = [await raw_exchange(port, _request("GET", "/x", alias)) for alias in ALIASES[:3]]
        plain = await raw_exchange(port, _request("GET", "/x", "X-Custom: 1"))
    assert [_status(a) for a in refused] == [400] * 3
    assert all(_field(a, "Content-Type") == "application/problem+json" for a in refused)
    assert _status(plain) == 200
    assert len(r.seen) == 1


async def test_field_names_with_underscores_never_reach_a_websocket_upstream(rec: Any) -> None:
    r, up_url = rec
    async with running_gateway(base_config(up_url)) as gw:
        assert gw.proxy_port is not None
        answer = await raw_exchange(
            gw.proxy_port,
            _request(
                "GET",
                "/ws",
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                *ALIASES,
                close=False,
            ),
            wait_s=0.5,
        )
    assert _status(answer) == 101, answer[:200]
    fields = r.fields()
    assert _underscored(fields) == []
    assert fields["x-forwarded-for"] == ["127.0.0.1"]


async def test_explain_says_what_happens_to_underscored_fields(rec: Any) -> None:
    _, up_url = rec
    token = "t0ken"
    cfg = base_config(up_url, request={"headers_with_underscores": "reject"})
    async with (
        running_gateway(cfg, {"GATEWAY_ADMIN_TOKEN": token}) as gw,
        aiohttp.ClientSession() as s,
    ):
        params = [("ip", "10.0.0.1"), ("path", "/x"), ("header", "X_Forwarded_For: 6.6.6.6")]
        async with s.get(
            admin_url(gw, "/admin/explain"),
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["underscore_fields"] == {"names": ["X_Forwarded_For"], "action": "reject"}
    assert doc["verdict"].startswith("400")
