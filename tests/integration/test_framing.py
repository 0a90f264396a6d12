"""RFC 9112 framing on the proxy port over real sockets: Host fields, transfer codings,
the host of absolute-form targets, bracketed IPv6 literals in ``allowed_hosts``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.gw import base_config, raw_exchange, running_gateway
from tests.integration.test_proxy import Upstream, _upgrade_request, _url

pytestmark = pytest.mark.timeout(60)

# what a refused request may carry behind it: it must never reach the upstream
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
NO_ABUSE = {"abuse": {"enabled": False}}  # many refusals from one address in a test


@pytest.fixture
async def upstream() -> Any:
    up = Upstream()
    server = TestServer(up.app, host="127.0.0.1")
    await server.start_server()
    try:
        yield up, server
    finally:
        await server.close()


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _status(raw: bytes) -> int:
    return int(raw[9:12]) if raw.startswith(b"HTTP/1.") else 0


def _assert_refused(raw: bytes, status: int, case: object) -> None:
    """One problem+json answer of ``status``, then the close (nothing after it served)."""
    assert _status(raw) == status, (case, raw[:300])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/problem+json" in head, case
    assert b"\r\nConnection: close" in head, case
    assert json.loads(body)["status"] == status, (case, body)  # and nothing after it


HOST_REFUSED = [
    pytest.param(["GET /a HTTP/1.1"], id="http11-no-host"),
    pytest.param(["GET /a HTTP/1.1", "Host: x", "Host: x"], id="two-equal-hosts"),
    pytest.param(["GET /a HTTP/1.1", "Host: a.example", "Host: b.example"], id="two-hosts"),
    pytest.param(["GET /a HTTP/1.1", "Host: a.example", "host: b.example"], id="two-hosts-case"),
    pytest.param(["GET /a HTTP/1.0", "Host: a.example", "Host: b.example"], id="http10-two"),
    pytest.param(["GET /a HTTP/1.1", "Host:"], id="empty-host"),
    pytest.param(["GET /a HTTP/1.1", "Host: a b"], id="host-with-space"),
    pytest.param(["GET /a HTTP/1.1", "Host: a.example, b.example"], id="host-list"),
    pytest.param(["GET /a HTTP/1.1", "Host: a.example/x"], id="host-with-slash"),
    pytest.param(["GET /a HTTP/1.1", "Host: u@a.example"], id="host-with-userinfo"),
    pytest.param(["GET /a HTTP/1.1", "Host: a.example:http"], id="host-port-not-numeric"),
    pytest.param(["GET /a HTTP/1.1", "Host: a.example:99999"], id="host-port-too-big"),
    pytest.param(["GET /a HTTP/1.1", "Host: ::1"], id="host-ipv6-unbracketed"),
    pytest.param(["GET /a HTTP/1.1", "Host: [::1"], id="host-ipv6-unclosed"),
    pytest.param(["GET /a HTTP/1.1", "Host: [::1]x"], id="host-ipv6-junk"),
    pytest.param(["GET http://a.example/a HTTP/1.1"], id="absolute-form-no-host"),
    pytest.param(["GET http://a.example/a HTTP/1.1", "Host: b.example"], id="absolute-form-other"),
    pytest.param(
        ["GET http://a.example/a HTTP/1.1", "Host: a.example:81"], id="absolute-other-port"
    ),
    pytest.param(["GET http://u@a.example/a HTTP/1.1", "Host: a.example"], id="absolute-userinfo"),
    pytest.param(["GET ftp://a.example/a HTTP/1.1", "Host: a.example"], id="absolute-ftp"),
    pytest.param(["GET http:///a HTTP/1.1", "Host: a.example"], id="absolute-empty-authority"),
]


@pytest.mark.parametrize("lines", HOST_REFUSED)
async def test_missing_repeated_or_invalid_host_is_400_and_closes(
    upstream: Any, lines: list[str]
) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server), **NO_ABUSE)) as gw:
        raw = await raw_exchange(gw.proxy_port or 0, _head(*lines) + SMUGGLED)
    _assert_refused(raw, 400, lines)
    assert up.seen == []


async def test_http10_without_host_and_matching_absolute_form_are_served(upstream: Any) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server), **NO_ABUSE)) as gw:
        port = gw.proxy_port or 0
        assert _status(await raw_exchange(port, _head("GET /ten HTTP/1.0"))) == 200
        raw = await raw_exchange(
            port,
            _head("GET http://A.example/abs HTTP/1.1", "Host: a.example:80", "Connection: close"),
        )
        assert _status(raw) == 200, raw[:200]
        raw = await raw_exchange(port, _head("GET http://a.example/abs10 HTTP/1.0"))
        assert _status(raw) == 200, raw[:200]
    assert [s["raw_path"] for s in up.seen] == ["/ten", "/abs", "/abs10"]
    assert up.seen[1]["headers"]["Host"] == "a.example:80"


def _post(te_lines: list[str], version: str = "1.1") -> bytes:
    fields = [f"Transfer-Encoding: {v}" for v in te_lines]
    return _head(f"POST /te HTTP/{version}", "Host: x", *fields) + b"5\r\nhello\r\n0\r\n\r\n"


TE_REFUSED = [
    pytest.param(["gzip, chunked"], 501, id="gzip-chunked"),
    pytest.param(["gzip", "chunked"], 501, id="gzip-then-chunked-lines"),
    pytest.param(["identity"], 501, id="identity"),
    pytest.param(["identity, chunked"], 501, id="identity-chunked"),
    pytest.param(["x-custom, chunked"], 501, id="custom-chunked"),
    pytest.param(["GZIP, Chunked"], 501, id="gzip-upper"),
    pytest.param(["gzip"], 501, id="gzip-alone"),
    pytest.param(["chunked, gzip"], 400, id="chunked-not-last"),
    pytest.param(["chunked", "gzip"], 400, id="chunked-not-last-lines"),
    pytest.param(["chunked, identity"], 400, id="chunked-identity"),
    pytest.param(["chunked, chunked"], 400, id="chunked-twice"),
    pytest.param(["chunked", "chunked"], 400, id="chunked-twice-lines"),
    pytest.param(["Chunked", "CHUNKED"], 400, id="chunked-twice-case"),
    pytest.param(["chunked;x=1"], 400, id="chunked-with-parameter"),
    pytest.param([""], 400, id="empty"),
    pytest.param([" , "], 400, id="empty-members"),
    pytest.param(['"chunked"'], 400, id="quoted"),
]


@pytest.mark.parametrize(("te_lines", "status"), TE_REFUSED)
async def test_transfer_codings_other_than_chunked_alone_are_refused(
    upstream: Any, te_lines: list[str], status: int
) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server), **NO_ABUSE)) as gw:
        raw = await raw_exchange(gw.proxy_port or 0, _post(te_lines) + SMUGGLED)
    _assert_refused(raw, status, te_lines)
    assert up.seen == []


async def test_http10_gets_the_same_transfer_coding_rules(upstream: Any) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server), **NO_ABUSE)) as gw:
        raw = await raw_exchange(gw.proxy_port or 0, _post(["gzip, chunked"], "1.0"))
    _assert_refused(raw, 501, "1.0 gzip")
    assert up.seen == []


@pytest.mark.parametrize(
    "te_lines", [["chunked"], ["Chunked"], ["CHUNKED"], [", chunked"], ["  chunked"]]
)
async def test_chunked_alone_in_any_spelling_is_served(upstream: Any, te_lines: list[str]) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server), **NO_ABUSE)) as gw:
        raw = await raw_exchange(gw.proxy_port or 0, _post(te_lines), wait_s=0.5)
    assert _status(raw) == 200, raw[:300]
    assert [(s["raw_path"], s["size"]) for s in up.seen] == [("/te", 5)]


def _upgrade(*replace: tuple[str, str | None]) -> bytes:
    """The raw WebSocket handshake of the proxy tests, with fields replaced or added."""
    lines = _upgrade_request("/ws").decode().split("\r\n")[:-2]
    for old, new in replace:
        lines = [ln for ln in lines if ln != old] if old in lines else lines
        if new is not None:
            lines.append(new)
    return _head(*lines)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(_upgrade(("Host: x", None)), 400, id="no-host"),
        pytest.param(_upgrade(("", "Host: y")), 400, id="two-hosts"),
        pytest.param(_upgrade(("Host: x", "Host: a b")), 400, id="bad-host"),
        pytest.param(_upgrade(("", "Transfer-Encoding: gzip, chunked")), 501, id="gzip"),
        pytest.param(
            _upgrade(("", "Transfer-Encoding: chunked, chunked")), 400, id="chunked-twice"
        ),
    ],
)
async def test_websocket_upgrades_follow_the_same_rules(
    upstream: Any, request_bytes: bytes, status: int
) -> None:
    up, server = upstream
    async with running_gateway(base_config(_url(server), **NO_ABUSE)) as gw:
        raw = await raw_exchange(gw.proxy_port or 0, request_bytes)
    _assert_refused(raw, status, request_bytes)
    assert up.ws_opened == 0


# ----------------------------------------------------------------- allowed_hosts


async def test_allowed_hosts_read_bracketed_ipv6_and_fqdn_spellings(upstream: Any) -> None:
    up, server = upstream
    cfg = base_config(
        _url(server),
        allowed_hosts=["api.example", "::1", "[2001:db8::7]"],
        abuse={"ban_score": 10, "scores": {"bad_request": 5}},
    )
    served = [
        "[::1]",
        "[::1]:8000",
        "[0:0::1]:8000",
        "[2001:DB8::7]",
        "API.example.",
        "api.example:",
        "api.example:8000",
    ]
    async with running_gateway(cfg) as gw:
        port = gw.proxy_port or 0
        # more than a ban's worth of them: none is scored (they were, as bad requests)
        for host in served * 2:
            raw = await raw_exchange(
                port, _head("GET /h HTTP/1.1", f"Host: {host}", "Connection: close")
            )
            assert _status(raw) == 200, (host, raw[:300])
        raw = await raw_exchange(port, _head("GET /h HTTP/1.1", "Host: [::2]", "Connection: close"))
        assert _status(raw) == 400
        raw = await raw_exchange(
            port, _head("GET /h HTTP/1.1", "Host: other.example", "Connection: close")
        )
        assert _status(raw) == 400
    assert len(up.seen) == len(served) * 2


async def test_allowed_hosts_apply_to_websocket_upgrades_with_ipv6_literals(upstream: Any) -> None:
    up, server = upstream
    cfg = base_config(_url(server), allowed_hosts=["::1"])
    async with running_gateway(cfg) as gw:
        port = gw.proxy_port or 0
        raw = await raw_exchange(port, _upgrade(("Host: x", "Host: [::1]")), wait_s=0.5)
        assert raw.startswith(b"HTTP/1.1 101 "), raw[:300]
        raw = await raw_exchange(port, _upgrade(("Host: x", "Host: [::2]")), wait_s=0.5)
        assert _status(raw) == 400, raw[:300]
    assert up.ws_opened == 1
