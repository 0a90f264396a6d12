"""The admin port of SPEC section 5: token rules, config, bans, reload, explain."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import free_port
from tests.gw import admin_url, base_config, raw_exchange, running_gateway, serve, url, wait_for

pytestmark = pytest.mark.timeout(30)

TOKEN = "adm1n-t0ken-value-9f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENV = {"GATEWAY_ADMIN_TOKEN": TOKEN}

ADMIN_CALLS = (
    ("GET", "/admin/config"),
    ("GET", "/admin/bans"),
    ("DELETE", "/admin/bans/10.1.2.3"),
    ("POST", "/admin/reload"),
    ("GET", "/admin/explain?ip=10.1.2.3&path=/x&method=GET"),
)


class Upstream:
    """A real upstream that records (method, path) of what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        if request.path != "/health":
            self.seen.append((request.method, request.path))
        return web.Response(text=f"upstream:{request.method} {request.path}")


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    async with serve(up.app) as url_:
        yield up, url_


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(
    s: aiohttp.ClientSession, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, str]:
    async with s.request(method, target, headers=headers) as resp:
        raw = await resp.read()
        body: Any = None
        if resp.content_type in ("application/json", "application/problem+json"):
            body = orjson.loads(raw)
        return resp.status, body, raw.decode(errors="replace")


async def explain(
    s: aiohttp.ClientSession, gw: Gateway, ip: str, path: str, method: str = "GET"
) -> dict[str, Any]:
    params = {"ip": ip, "path": path, "method": method}
    async with s.get(admin_url(gw, "/admin/explain"), params=params, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


# --------------------------------------------------------------------------- token rules


@pytest.mark.parametrize(("method", "path"), ADMIN_CALLS)
async def test_admin_refused_without_configured_token(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession, method: str, path: str
) -> None:
    _, up_url = upstream
    async with running_gateway(base_config(up_url), {}) as gw:
        for headers in (None, AUTH, {"Authorization": "Bearer "}):
            status, body, _ = await call(session, method, admin_url(gw, path), headers)
            assert status == 403, (headers, body)
            assert body["status"] == 403
            assert "token" in body["detail"]


@pytest.mark.parametrize("endpoint", ADMIN_CALLS, ids=" ".join)
@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("", 401),
        (f"Bearer {TOKEN}x", 401),
        (f"Bearer {TOKEN[:-1]}", 401),
        ("Bearer wrong", 401),
        (f"Basic {TOKEN}", 401),
        (TOKEN, 401),
        (f"Bearer {TOKEN}", None),  # accepted: whatever the endpoint itself answers
        (f"bearer {TOKEN}", None),  # the scheme is case-insensitive (RFC 9110 11.1)
    ],
)
async def test_admin_token(
    upstream: tuple[Upstream, str],
    session: aiohttp.ClientSession,
    endpoint: tuple[str, str],
    authorization: str | None,
    status: int | None,
) -> None:
    _, up_url = upstream
    method, path = endpoint
    async with running_gateway(base_config(up_url), ENV) as gw:
        headers = None if authorization is None else {"Authorization": authorization}
        got, body, _ = await call(session, method, admin_url(gw, path), headers)
    if status == 401:
        assert got == 401, body
        assert body["status"] == 401
    else:
        assert got not in (401, 403), body
        # the endpoints' own answers with a valid token
        expected = {"POST": 422, "DELETE": 404}.get(method, 200)
        assert got == expected, body


async def test_wrong_token_gets_www_authenticate(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    _, up_url = upstream
    async with running_gateway(base_config(up_url), ENV) as gw:
        target = admin_url(gw, "/admin/bans")
        async with session.get(target, headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in await resp.text()


@pytest.mark.parametrize(
    "target",
    [
        "/admin/config",
        "/%61dmin/config",
        "/admin/./config",
        "/admin/%2e/config",
        "/admin//config",
        "//admin/config",
        "/./admin/config",
        "/metrics/../admin/config",
        "http://gateway/admin/config",
        "/admin/config?token=" + TOKEN,
    ],
)
async def test_no_spelling_of_an_admin_path_skips_the_token(
    upstream: tuple[Upstream, str], target: str
) -> None:
    _, up_url = upstream
    async with running_gateway(base_config(up_url), ENV) as gw:
        request = f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        reply = await raw_exchange(gw.admin_port or 0, request.encode(), wait_s=0.5)
    status = reply.split(b" ", 2)[1]
    assert status in (b"401", b"404"), reply[:200]
    assert b"token_env" not in reply  # the config never leaks


@pytest.mark.parametrize("env", [{}, ENV], ids=["no-token", "token"])
async def test_metrics_and_probes_need_no_token(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession, env: dict[str, str]
) -> None:
    _, up_url = upstream
    async with running_gateway(base_config(up_url), env) as gw:
        assert await wait_for(lambda: gw.runtime.monitor.started)
        status, _, text = await call(session, "GET", admin_url(gw, "/metrics"))
        assert status == 200
        assert "gateway_build_info" in text
        for probe in ("/livez", "/readyz", "/startupz", "/healthz", "/readyz/upstream:api"):
            status, _, text = await call(session, "GET", admin_url(gw, probe))
            assert (status, text.strip()) == (200, "ok"), probe


# --------------------------------------------------------------------------- config


async def test_config_is_effective_and_redacted(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    _, up_url = upstream
    secrets = {
        "GATEWAY_ADMIN_TOKEN": TOKEN,
        "BOT_WEBHOOK_SECRET": "bot-webhook-s3cret-71c2",
        "GATEWAY_REDIS_URL": "redis://:redis-pa55-4e1d@127.0.0.1:6390/3",
        "GATEWAY_DATABASE_URL": "postgresql://gw:db-pa55-88aa@127.0.0.1:1/app",
    }
    cfg = base_config(
        up_url,
        routes=[
            {
                "name": "bot",
                "path_prefix": "/bot/",
                "upstream": "api",
                "methods": ["POST"],
                "shared_secret": {
                    "header": "X-Telegram-Bot-Api-Secret-Token",
                    "value_env": "BOT_WEBHOOK_SECRET",
                },
            },
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
        database={"interval_s": 30, "timeout_s": 0.5},
        rate_limit={"policies": {"p": {"requests": 7, "period_s": 3}}},
    )
    async with running_gateway(cfg, secrets) as gw:
        status, body, raw = await call(session, "GET", admin_url(gw, "/admin/config"), AUTH)
    assert status == 200
    for name, value in secrets.items():
        assert name in raw  # the *_env names are shown ...
        assert value not in raw, name  # ... their values never
    for fragment in ("s3cret-71c2", "pa55-4e1d", "pa55-88aa", "t0ken-value"):
        assert fragment not in raw
    effective = body["config"]
    # the effective config: given values and filled-in defaults
    assert effective["listen"]["port"] == cfg["listen"]["port"]
    assert effective["routes"][0]["shared_secret"] == {
        "header": "X-Telegram-Bot-Api-Secret-Token",
        "value_env": "BOT_WEBHOOK_SECRET",
    }
    assert effective["rate_limit"]["policies"]["p"]["requests"] == 7
    assert effective["rate_limit"]["redis_url_env"] == "GATEWAY_REDIS_URL"
    assert effective["database"]["dsn_env"] == "GATEWAY_DATABASE_URL"
    assert effective["abuse"]["ban_score"] == 50  # a default
    assert effective["admin"]["token_env"] == "GATEWAY_ADMIN_TOKEN"


# --------------------------------------------------------------------------- bans


async def test_bans_list_and_unban(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    up, up_url = upstream
    async with running_gateway(base_config(up_url), ENV) as gw:
        status, body, _ = await call(session, "GET", admin_url(gw, "/admin/bans"), AUTH)
        assert (status, body) == (200, {"bans": []})
        # two suspicious paths (25 points each) reach ban_score 50
        assert [(await call(session, "GET", url(gw, "/.env")))[0] for _ in range(2)] == [200, 403]
        assert (await call(session, "GET", url(gw, "/hello")))[0] == 403

        before = time.time()
        status, body, _ = await call(session, "GET", admin_url(gw, "/admin/bans"), AUTH)
        assert status == 200
        (ban,) = body["bans"]
        assert ban["ip"] == "127.0.0.1"
        assert ban["reason"] == "suspicious_path"
        assert ban["score"] >= 50
        assert ban["offences"] == 1
        assert before + 590 < ban["expires_at"] <= before + 600  # abuse.ban_s default 600

        registry = gw.runtime.metrics.registry
        assert registry.get_sample_value("gateway_active_bans") == 1

        target = admin_url(gw, "/admin/bans/127.0.0.1")
        status, body, _ = await call(session, "DELETE", target, AUTH)
        assert (status, body) == (200, {"unbanned": "127.0.0.1"})
        assert registry.get_sample_value("gateway_active_bans") == 0
        reason = {"reason": "suspicious_path"}
        assert registry.get_sample_value("gateway_bans_total", reason) == 1
        assert (await call(session, "GET", url(gw, "/hello")))[0] == 200  # through again
        assert ("GET", "/hello") in up.seen
        status, body, _ = await call(session, "GET", admin_url(gw, "/admin/bans"), AUTH)
        assert (status, body) == (200, {"bans": []})

        status, body, _ = await call(session, "DELETE", target, AUTH)  # no longer banned
        assert status == 404
        assert body["status"] == 404
        status, _, _ = await call(session, "DELETE", admin_url(gw, "/admin/bans/10.1.2.3"), AUTH)
        assert status == 404
        for not_ip in ("not-an-ip", "10.1.2", "999.1.1.1"):
            target = admin_url(gw, f"/admin/bans/{not_ip}")
            status, body, _ = await call(session, "DELETE", target, AUTH)
            assert status == 400, not_ip
            assert body["status"] == 400


# --------------------------------------------------------------------------- reload


async def test_reload_without_config_file_is_an_error(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    _, up_url = upstream
    async with running_gateway(base_config(up_url), ENV) as gw:
        status, body, _ = await call(session, "POST", admin_url(gw, "/admin/reload"), AUTH)
        assert status >= 400
        assert body["reloaded"] is False
        assert body["errors"]
        assert "file" in body["errors"][0]
        # nothing was counted as a reload (there is nothing to reload)
        metrics = gw.runtime.metrics.registry
        for result in ("success", "failure"):
            value = metrics.get_sample_value("gateway_config_reloads_total", {"result": result})
            assert value == 0


# --------------------------------------------------------------------------- explain


def _explain_config(up_url: str) -> dict[str, Any]:
    return base_config(
        up_url,
        trusted_proxies=["127.0.0.0/8"],
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["two"]}],
        rate_limit={"policies": {"two": {"requests": 1, "period_s": 60, "burst": 2}}},
    )


async def test_explain_reports_without_counting(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    _, up_url = upstream
    ip = "10.9.8.7"
    xff = {"X-Forwarded-For": ip}
    async with running_gateway(_explain_config(up_url), ENV) as gw:
        first = await explain(session, gw, ip, "/things")
        assert first["route"] == "api"
        assert first["client_key"] == ip
        assert first["ban"] is None
        assert first["abuse_score"] == 0
        assert first["breaker"] == "closed"
        (policy,) = first["policies"]
        assert policy["policy"] == "two"
        assert policy["would_allow"] is True
        assert policy["remaining"] == 1  # burst 2: one left after such a request
        assert "proxied" in first["verdict"]

        for _ in range(100):
            last = await explain(session, gw, ip, "/things")
        assert last == first  # nothing was spent

        # the whole burst is still there for the real client
        statuses = [(await call(session, "GET", url(gw, "/things"), xff))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]

        after = await explain(session, gw, ip, "/things")
        (policy,) = after["policies"]
        assert policy["would_allow"] is False
        assert policy["remaining"] == 0
        assert policy["retry_after_s"] > 0
        assert after["verdict"].startswith("429")
        assert 0 < after["abuse_score"] <= 1  # the 429 scored rate_limited (1 point)


async def test_explain_shows_ban_and_open_breaker(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    _, up_url = upstream
    cfg = base_config(
        up_url,
        trusted_proxies=["127.0.0.0/8"],
        upstreams={
            "api": {"url": up_url, "health": {"interval_s": 0.2}},
            "gone": {
                "url": f"http://127.0.0.1:{free_port()}",
                "circuit_breaker": {"consecutive_failures": 1, "open_s": 60},
                "retries": {"attempts": 1},
            },
        },
        routes=[
            {"name": "gone", "path_prefix": "/gone/", "upstream": "gone"},
            {"name": "api", "path_prefix": "/", "upstream": "api"},
        ],
    )
    banned = "10.9.8.8"
    async with running_gateway(cfg, ENV) as gw:
        for _ in range(2):
            await call(session, "GET", url(gw, "/wp-login.php"), {"X-Forwarded-For": banned})
        result = await explain(session, gw, banned, "/anything")
        assert result["ban"]["reason"] == "suspicious_path"
        assert result["ban"]["offences"] == 1
        assert result["ban"]["expires_at"] > time.time()
        assert result["verdict"].startswith("403")

        assert (await call(session, "GET", url(gw, "/gone/x")))[0] == 502
        result = await explain(session, gw, "10.9.8.9", "/gone/x")
        assert result["route"] == "gone"
        assert result["breaker"] == "open"
        assert result["verdict"].startswith("503")

        result = await explain(session, gw, "10.9.8.9", "/.env")
        assert result["suspicious_path"] is True
        assert result["abuse_score"] == 0  # explaining a suspicious path scores nothing

        status, body, _ = await call(
            session, "GET", admin_url(gw, "/admin/explain?ip=nope&path=/"), AUTH
        )
        assert status == 400
        assert body["status"] == 400


# --------------------------------------------------------------------------- proxy port


async def test_admin_paths_on_proxy_port_are_proxied(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    up, up_url = upstream
    async with running_gateway(base_config(up_url), ENV) as gw:
        for method, path in ADMIN_CALLS:
            status, _, text = await call(session, method, url(gw, path), AUTH)
            assert status == 200, (method, path)
            assert text == f"upstream:{method} {path.split('?', 1)[0]}"
        assert up.seen == [(m, p.split("?", 1)[0]) for m, p in ADMIN_CALLS]
        # and nothing happened on the gateway's side: no reload was attempted
        registry = gw.runtime.metrics.registry
        value = registry.get_sample_value("gateway_config_reloads_total", {"result": "failure"})
        assert value == 0


# header names are case-insensitive in explain as in the pipeline
HEADER_NAMES = [
    pytest.param("exact", id="same-case"),
    pytest.param("lower", id="lower-case"),
    pytest.param("upper", id="upper-case"),
]


def _cased(name: str, case: str) -> str:
    return {"exact": name, "lower": name.lower(), "upper": name.upper()}[case]


@pytest.mark.parametrize("case", HEADER_NAMES)
async def test_explain_header_key_matches_the_pipeline(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession, case: str
) -> None:
    """explain keys a header policy like a request does: header names are case-insensitive."""
    _, up_url = upstream
    cfg = base_config(
        up_url,
        routes=[{"name": "api", "path_prefix": "/", "upstream": "api", "rate_limits": ["key"]}],
        rate_limit={
            "policies": {
                "key": {"requests": 1, "period_s": 60, "burst": 1, "key": "header:X-Api-Key"}
            }
        },
    )
    async with running_gateway(cfg, ENV) as gw:
        assert (await call(session, "GET", url(gw, "/x"), {"X-Api-Key": "k1"}))[0] == 200
        params = {"ip": "10.1.1.1", "path": "/x", "header": _cased("X-Api-Key", case) + ":k1"}
        target = admin_url(gw, "/admin/explain")
        async with session.get(target, params=params, headers=AUTH) as resp:
            assert resp.status == 200
            result = await resp.json()
    (policy,) = result["policies"]
    assert policy["key"] == "h:k1"
    assert policy["would_allow"] is False  # k1 spent its burst of 1 above
    assert result["verdict"].startswith("429")


@pytest.mark.parametrize(
    ("ip", "key"),
    [("10.1.2.3", "10.1.2.3"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("::1", "::/64")],
)
async def test_explain_client_key(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession, ip: str, key: str
) -> None:
    _, up_url = upstream
    async with running_gateway(_explain_config(up_url), ENV) as gw:
        result = await explain(session, gw, ip, "/")
    assert result["client_key"] == key
    assert result["policies"][0]["key"] == key


async def _explain_with(
    s: aiohttp.ClientSession, gw: Gateway, header: str | None
) -> dict[str, Any]:
    params = {"ip": "10.1.1.1", "path": "/bot/hook", "method": "POST"}
    if header is not None:
        params["header"] = header
    async with s.get(admin_url(gw, "/admin/explain"), params=params, headers=AUTH) as resp:
        assert resp.status == 200
        result: dict[str, Any] = await resp.json()
        return result


@pytest.mark.parametrize("case", HEADER_NAMES)
async def test_explain_shared_secret(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession, case: str
) -> None:
    _, up_url = upstream
    header = "X-Telegram-Bot-Api-Secret-Token"
    cfg = base_config(
        up_url,
        routes=[
            {
                "name": "bot",
                "path_prefix": "/bot/",
                "upstream": "api",
                "shared_secret": {"header": header, "value_env": "BOT_SECRET"},
            }
        ],
    )
    secret = "b0t-secret-5d1e"
    async with running_gateway(cfg, {**ENV, "BOT_SECRET": secret}) as gw:
        # the pipeline itself takes the header in any case
        lowered = {header.lower(): secret}
        assert (await call(session, "POST", url(gw, "/bot/hook"), lowered))[0] == 200
        valid = await _explain_with(session, gw, f"{_cased(header, case)}:{secret}")
        wrong = await _explain_with(session, gw, f"{header}:wrong")
        missing = await _explain_with(session, gw, None)
    assert (wrong["shared_secret"], missing["shared_secret"]) == ("wrong", "missing")
    assert wrong["verdict"].startswith("403")
    assert secret not in orjson.dumps(valid).decode()
    assert valid["shared_secret"] == "valid"
    assert "proxied" in valid["verdict"]


async def test_an_ipv6_client_is_scored_and_banned_by_its_prefix(
    upstream: tuple[Upstream, str], session: aiohttp.ClientSession
) -> None:
    """Behind a trusted proxy, an IPv6 client that changes the rest of its address on
    every request is still one client (rate_limit.ipv6_prefix, /64): the second
    suspicious path bans the prefix, and any address in it lifts the ban."""
    _, up_url = upstream
    cfg = base_config(up_url, trusted_proxies=["127.0.0.1/32"])
    async with running_gateway(cfg, ENV) as gw:

        async def get(path: str, host_part: int) -> int:
            xff = {"X-Forwarded-For": f"2001:db8:1:2::{host_part:x}"}
            return (await call(session, "GET", url(gw, path), xff))[0]

        assert [await get("/.env", i) for i in (1, 2)] == [200, 403]
        assert await get("/hello", 3) == 403  # a new address in the prefix: still banned
        other = {"X-Forwarded-For": "2001:db8:1:3::1"}  # another /64
        assert (await call(session, "GET", url(gw, "/hello"), other))[0] == 200

        status, body, _ = await call(session, "GET", admin_url(gw, "/admin/bans"), AUTH)
        assert [b["ip"] for b in body["bans"]] == ["2001:db8:1:2::/64"]
        target = admin_url(gw, "/admin/bans/2001:db8:1:2::77")
        status, body, _ = await call(session, "DELETE", target, AUTH)
        assert (status, body) == (200, {"unbanned": "2001:db8:1:2::/64"})
        assert await get("/hello", 4) == 200

        # lifted by the value the list shows, too
        assert [await get("/.env", i) for i in (5, 6)] == [200, 403]
        target = admin_url(gw, "/admin/bans/2001:db8:1:2::/64")
        status, body, _ = await call(session, "DELETE", target, AUTH)
        assert (status, body) == (200, {"unbanned": "2001:db8:1:2::/64"})
        # a ban kept under the whole address (made under another ipv6_prefix)
        for _ in range(2):
            gw.runtime.bans.report("2001:db8:9::1", "suspicious_path")
        target = admin_url(gw, "/admin/bans/2001:db8:9::1")
        status, body, _ = await call(session, "DELETE", target, AUTH)
        assert (status, body) == (200, {"unbanned": "2001:db8:9::1"})
        status, _, _ = await call(session, "DELETE", admin_url(gw, "/admin/bans/10.0.0.0/x"), AUTH)
        assert status == 400


# --------------------------------------------------------------------------- hostile input
# The admin port answers any input with a 4xx problem+json, never a 500 (SPEC section 9).


def _raw(target: bytes, *fields: bytes, method: bytes = b"GET", auth: bool = True) -> bytes:
    head = [method + b" " + target + b" HTTP/1.1", b"Host: a", b"Connection: close"]
    if auth:
        head.append(b"Authorization: Bearer " + TOKEN.encode())
    return b"\r\n".join([*head, *fields, b"", b""])


def _parse_reply(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), fields, body


_EXPLAIN = b"/admin/explain?ip=10.1.2.3&path=/x"
HOSTILE_ADMIN_INPUT = [
    # the token: any bytes that are not the token are a 401
    pytest.param(
        _raw(b"/admin/config", b"Authorization: Bearer \xff\xfe", auth=False),
        401,
        id="token-not-utf8",
    ),
    pytest.param(
        _raw(b"/admin/config", b"Authorization: Bearer " + TOKEN.encode() + b"\xff", auth=False),
        401,
        id="token-then-non-utf8",
    ),
    pytest.param(
        _raw(b"/admin/config", b"Authorization: \xff\xfe " + TOKEN.encode(), auth=False),
        401,
        id="scheme-not-utf8",
    ),
    pytest.param(
        _raw(b"/admin/config", b"Authorization: Bearer \xc3\xa9\xe2\x82\xac", auth=False),
        401,
        id="token-utf8-non-ascii",
    ),
    pytest.param(
        _raw(b"/admin/config", b"Authorization: Bearer \x01\x7f", auth=False), None, id="token-ctl"
    ),
    pytest.param(
        _raw(b"/admin/config", b"Authorization: Bearer x"), 401, id="token-twice-right-first"
    ),
    pytest.param(
        _raw(b"/admin/config", b"Authorization: Bearer " + TOKEN.encode(), auth=False)[:-2]
        + b"Authorization: Bearer x\r\n\r\n",
        401,
        id="token-twice-wrong-last",
    ),
    # routing: unknown paths and methods
    pytest.param(_raw(b"/nope", auth=False), 404, id="404-no-token"),
    pytest.param(_raw(b"/admin/nope"), 404, id="404-admin"),
    pytest.param(_raw(b"/admin/%ff"), 404, id="404-percent-non-utf8"),
    pytest.param(_raw(b"/metrics", b"Content-Length: 0", method=b"POST"), 405, id="405-metrics"),
    pytest.param(_raw(b"/admin/config", b"Content-Length: 0", method=b"PUT"), 405, id="405-admin"),
    pytest.param(_raw(b"/livez", method=b"TRACE", auth=False), 405, id="405-trace"),
    pytest.param(_raw(b"*", method=b"OPTIONS", auth=False), None, id="options-asterisk"),
    pytest.param(_raw(b"a:1", method=b"CONNECT", auth=False), None, id="connect"),
    # the parser's own rejections
    pytest.param(_raw(b"/\xff", auth=False), 400, id="path-not-utf8"),
    pytest.param(_raw(b"/readyz/\xff", auth=False), 400, id="probe-name-not-utf8"),
    pytest.param(_raw(b"/admin/config?x=\xff"), 400, id="query-not-utf8"),
    pytest.param(_raw(b"/admin/" + b"a" * 9000), 431, id="target-too-long"),
    pytest.param(_raw(b"/metrics", b"X: " + b"a" * 9000, auth=False), 431, id="field-too-long"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="not-http"),
    # /admin/explain: every parameter is checked
    pytest.param(_raw(b"/admin/explain?ip=garbage"), 400, id="explain-ip-garbage"),
    pytest.param(_raw(b"/admin/explain?ip=%ff%fe"), 400, id="explain-ip-bad-encoding"),
    pytest.param(_raw(b"/admin/explain?ip=%zz"), 400, id="explain-ip-bad-escape"),
    pytest.param(_raw(b"/admin/explain?ip=" + b"1" * 7000), 400, id="explain-ip-huge"),
    pytest.param(_raw(b"/admin/explain"), 400, id="explain-ip-missing"),
    pytest.param(_raw(_EXPLAIN + b"&ip=10.9.9.9"), 400, id="explain-ip-repeated"),
    pytest.param(_raw(_EXPLAIN + b"&path=/admin"), 400, id="explain-path-repeated"),
    pytest.param(_raw(_EXPLAIN + b"&method=GET&method=POST"), 400, id="explain-method-repeated"),
    pytest.param(_raw(b"/admin/explain?ip=10.1.2.3&path=x"), 400, id="explain-path-relative"),
    pytest.param(_raw(b"/admin/explain?ip=10.1.2.3&path=/%00"), 400, id="explain-path-nul"),
    pytest.param(_raw(_EXPLAIN + b"&method=%00"), 400, id="explain-method-nul"),
    pytest.param(_raw(_EXPLAIN + b"&method=G%20T"), 400, id="explain-method-space"),
    pytest.param(_raw(_EXPLAIN + b"&header=novalue"), 400, id="explain-header-no-colon"),
    pytest.param(_raw(_EXPLAIN + b"&header=:v"), 400, id="explain-header-no-name"),
    pytest.param(_raw(_EXPLAIN + b"&header=X%20Y:v"), 400, id="explain-header-bad-name"),
    pytest.param(_raw(_EXPLAIN + b"&header=X:a%0d%0aY:%20b"), 400, id="explain-header-crlf"),
    # DELETE /admin/bans/<garbage>
    pytest.param(_raw(b"/admin/bans/%ff", method=b"DELETE"), 400, id="unban-bad-encoding"),
    pytest.param(_raw(b"/admin/bans/%00", method=b"DELETE"), 400, id="unban-nul"),
    pytest.param(_raw(b"/admin/bans/1.2.3.4/999", method=b"DELETE"), 400, id="unban-bad-prefix"),
    pytest.param(_raw(b"/admin/bans/::1/a/b", method=b"DELETE"), 400, id="unban-garbage-prefix"),
    pytest.param(_raw(b"/admin/bans/" + b"9" * 7000, method=b"DELETE"), 400, id="unban-huge"),
    pytest.param(_raw(b"/admin/bans/", method=b"DELETE"), 404, id="unban-empty"),
    # POST: the body is not read, whatever it is
    pytest.param(
        _raw(
            b"/admin/reload",
            b"Content-Type: application/json",
            b"Content-Length: 5",
            method=b"POST",
        )
        + b"{{{{{",
        422,
        id="reload-bad-json",
    ),
    # a body in a coding: never decoded (a bad one made aiohttp log "Unhandled exception"
    # with a traceback as it drained it; a good one was inflated for nothing)
    *(
        pytest.param(
            _raw(target, b"Content-Encoding: " + coding, b"Content-Length: 5", method=method)
            + b"xxxxx",
            status if coding != b"br" else None,  # (br: decoded by an optional package)
            id=f"body-{coding.decode()}-{method.decode()}-{target.decode()}",
        )
        for coding in (b"gzip", b"deflate", b"br")
        for target, method, status in (
            (b"/admin/config", b"DELETE", 405),
            (b"/admin/bans/1.2.3.4", b"DELETE", 404),
            (b"/nope", b"POST", 404),
        )
    ),
    pytest.param(
        _raw(b"/admin/config", b"Content-Encoding: gzip", b"Content-Length: 5", auth=False)
        + b"xxxxx",
        401,
        id="body-gzip-no-token",
    ),
]


@pytest.mark.parametrize(("request_", "status"), HOSTILE_ADMIN_INPUT)
async def test_hostile_admin_input_is_a_4xx_problem(
    upstream: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
    request_: bytes,
    status: int | None,
) -> None:
    """Whatever the bytes, the admin port answers a 4xx problem+json (None: any 4xx),
    and logs no traceback for it."""
    _, up_url = upstream
    async with running_gateway(base_config(up_url), ENV) as gw:
        reply = await raw_exchange(gw.admin_port or 0, request_, wait_s=2)
    got, fields, body = _parse_reply(reply)
    assert got == status if status is not None else 400 <= got < 500, reply[:300]
    if got == 422:  # POST /admin/reload's own answer: the errors, as JSON
        assert orjson.loads(body)["reloaded"] is False
        return
    assert fields["content-type"] == "application/problem+json", reply[:300]
    problem = orjson.loads(body)
    assert problem["status"] == got
    assert TOKEN not in body.decode(errors="replace")
    if got == 405:
        assert fields["allow"]
    # aiohttp logs "Error handling request" with a traceback for what it calls an error
    tracebacks = [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp.")]
    assert tracebacks == []
