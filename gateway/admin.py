"""The admin port: metrics, probes and the token-guarded /admin API."""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.explain import explain_request
from gateway.pipeline.client_ip import parse_ip
from gateway.pipeline.headers import ResponseHeaders
from gateway.probes import probe_response
from gateway.problem import problem_response
from gateway.reload import Reloader
from gateway.runtime import Runtime

RUNTIME = web.AppKey("runtime", Runtime)
RELOADER = web.AppKey("reloader", Reloader)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _rt(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=str), status=status, content_type="application/json"
    )


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/admin/"):
        return await handler(request)
    rt = _rt(request)
    token = rt.settings.secrets.admin_token
    if token is None:
        return problem_response(
            403,
            "no admin token is configured (admin.token_env): the admin API is disabled",
            request_id=None,
        )
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        return problem_response(
            401,
            "a valid bearer token is required",
            request_id=None,
            headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
        )
    return await handler(request)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    rt = _rt(request)
    headers: ResponseHeaders = rt.snapshot.response_headers
    headers.apply(response.headers, None, secure=False)
    response.headers.setdefault("Cache-Control", "no-store")


async def metrics(request: web.Request) -> web.StreamResponse:
    return _rt(request).metrics_response()


async def probe(request: web.Request) -> web.StreamResponse:
    resp = await probe_response(request, _rt(request).monitor)
    if resp is None:
        raise web.HTTPNotFound
    return resp


async def config(request: web.Request) -> web.StreamResponse:
    rt = _rt(request)
    s = rt.settings
    return _json(
        {
            "source": s.source,
            "digest": s.digest,
            "config": s.config.model_dump(mode="json"),
            "warnings": [str(w) for w in s.warnings],
        }
    )


async def bans(request: web.Request) -> web.StreamResponse:
    items = await _rt(request).bans.list_bans()
    return _json(
        {
            "bans": [
                {
                    "ip": b.ip,
                    "reason": b.reason,
                    "score": b.score,
                    "expires_at": b.expires_at,
                    "expires_in_s": max(0.0, round(b.expires_at - time.time(), 3)),
                    "offences": b.offences,
                }
                for b in items
            ]
        }
    )


async def unban(request: web.Request) -> web.StreamResponse:
    raw = request.match_info["ip"]
    rt = _rt(request)
    keys: tuple[str, ...]
    if "/" in raw:  # a prefix, as GET /admin/bans lists an IPv6 client's ban
        try:
            keys = (str(ipaddress.ip_network(raw, strict=False)),)
        except ValueError:
            return problem_response(400, "not an IP address or prefix", request_id=None)
    else:
        ip = parse_ip(raw)
        if ip is None:
            return problem_response(400, "not an IP address", request_id=None)
        # an IPv6 address is banned as its prefix; the address itself too: a ban made
        # under another rate_limit.ipv6_prefix
        keys = tuple(dict.fromkeys((rt.snapshot.ip_key(ip), str(ip))))
    for key in keys:
        if await rt.bans.unban(key):
            return _json({"unbanned": key})
    return problem_response(404, f"{keys[0]} is not banned", request_id=None)


async def reload(request: web.Request) -> web.StreamResponse:
    reloader = request.app[RELOADER]
    ok, errors = await reloader.reload("admin")
    return _json({"reloaded": ok, "errors": errors}, status=200 if ok else 422)


async def explain(request: web.Request) -> web.StreamResponse:
    q = request.query
    ip = parse_ip(q.get("ip", ""))
    if ip is None:
        return problem_response(400, "query parameter ip must be an IP address", request_id=None)
    headers: CIMultiDict[str] = CIMultiDict()
    for h in q.getall("header", []):
        name, sep, value = h.partition(":")
        if not sep:
            return problem_response(400, f"header must be Name:Value, got {h!r}", request_id=None)
        headers.add(name.strip(), value.strip())
    result = await explain_request(
        _rt(request), ip, q.get("path", "/"), q.get("method", "GET").upper(), headers
    )
    return _json(result)


def create_admin_app(runtime: Runtime, reloader: Reloader) -> web.Application:
    """The admin port's application (explicit factory; no global state)."""
    app = web.Application(middlewares=[_auth])
    app[RUNTIME] = runtime
    app[RELOADER] = reloader
    app.on_response_prepare.append(_on_prepare)
    r = app.router
    r.add_get("/metrics", metrics)
    for path in ("/livez", "/readyz", "/startupz", "/healthz", "/readyz/{name}"):
        r.add_get(path, probe)
    r.add_get("/admin/config", config)
    r.add_get("/admin/bans", bans)
    r.add_delete("/admin/bans/{ip:.+}", unban)  # an address, or a prefix as listed
    r.add_post("/admin/reload", reload)
    r.add_get("/admin/explain", explain)
    return app
