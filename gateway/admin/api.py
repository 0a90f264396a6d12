"""The admin port: metrics, probes and the token-guarded /admin API."""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import math
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from gateway import __version__
from gateway.admin.explain import explain_request
from gateway.admin.guard import AdminAuthGuard
from gateway.core.allowlist import MAX_TTL_S, EntryError, IPNetwork, check_request, parse_target
from gateway.core.client_ip import parse_ip
from gateway.core.health import aggregate
from gateway.core.window_stats import RouteSeries, Summary
from gateway.health.probes import probe_response
from gateway.pipeline.headers import ResponseHeaders
from gateway.problem import CONTENT_TYPE, problem_body, problem_response, server_error_answer
from gateway.reload import Reloader
from gateway.runtime import Runtime
from gateway.stores.allow import AllowListFullError, AllowUnavailableError

STATS_BANS = 100
"""Bans listed by ``/admin/stats`` (the newest; ``bans_total`` counts them all)."""

RUNTIME = web.AppKey("runtime", Runtime)
RELOADER = web.AppKey("reloader", Reloader)
GUARD = web.AppKey("guard", AdminAuthGuard)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token: methods, names
_FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB


def _rt(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=str), status=status, content_type="application/json"
    )


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's own 404 and 405 (and any other HTTP error) as problem+json."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # a redirect is not an error
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        detail = (
            f"{request.method} is not allowed here"
            if exc.status == 405
            else "no such admin endpoint"
            if exc.status == 404
            else exc.reason
        )
        return problem_response(exc.status, detail, request_id=None, headers=headers)


def _bearer_ok(request: web.Request, token: bytes) -> bool:
    """Exactly one Authorization field, ``Bearer <token>``; any bytes compare safely.

    aiohttp decodes field values as UTF-8 with surrogate escapes: encoding them back
    the same way gives the bytes the client sent, so a value that is not UTF-8 is just
    another wrong token.  Two fields are refused: a front proxy may read the other one.
    """
    given = request.headers.getall("Authorization", ())
    if len(given) != 1:
        return False
    scheme, _, value = given[0].partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8", "surrogateescape"), token
    )


# the operator page and its files carry no data: they need no token (SPEC section 12)
_UI_FILES = {
    "/admin/ui": ("index.html", "text/html"),
    "/admin/ui/app.js": ("app.js", "text/javascript"),
    "/admin/ui/style.css": ("style.css", "text/css"),
}
_UI_CSP = (
    "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_ADMIN_CSP = "default-src 'none'; frame-ancestors 'none'"


def _harden(headers: CIMultiDict[str], *, ui: bool) -> None:
    """The admin port's own floor on every answer, errors included, whatever
    ``security_headers`` says for the proxy port (off, or another CSP that ``override``
    would put on the operator page and so block its script): no sniffing, no framing, no
    caching, no server software named; ``ui``: one of the operator page's files."""
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Security-Policy"] = _UI_CSP if ui else _ADMIN_CSP
    headers.setdefault("Cache-Control", "no-store")
    headers.popall("Server", None)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/admin/") or request.path in _UI_FILES:
        return await handler(request)
    rt = _rt(request)
    token = rt.settings.secrets.admin_token
    if token is None:
        return problem_response(
            403,
            "no admin token is configured (admin.token_env): the admin API is disabled",
            request_id=None,
        )
    # guessing is bounded per address: past its failures, even the right token waits
    guard, client, now = request.app[GUARD], _client_key(request), time.monotonic()
    wait = guard.wait_s(client, now)
    if wait > 0.0:
        return problem_response(
            429,
            "too many failed admin authentications from this address: wait for Retry-After",
            request_id=None,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    if not _bearer_ok(request, token.encode()):
        guard.failed(client, now)
        return problem_response(
            401,
            "a valid bearer token is required",
            request_id=None,
            headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
        )
    return await handler(request)


def _client_key(request: web.Request) -> str:
    """The address the failures are counted for: an IPv6 client by its prefix."""
    ip = parse_ip(request.remote or "")
    return "-" if ip is None else _rt(request).snapshot.ip_key(ip)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    rt = _rt(request)
    headers: ResponseHeaders = rt.snapshot.response_headers
    headers.apply(response.headers, None, secure=False)
    _harden(response.headers, ui=response.status == 200 and request.path in _UI_FILES)


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
    store = _rt(request).bans
    items = await store.list_bans()
    evidence = await store.evidence([b.ip for b in items])
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
                    "banned_at": b.banned_at,
                    "evidence": [e.as_dict() for e in evidence.get(b.ip, ())],
                }
                for b in items
            ]
        }
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _figures(s: Summary, span_s: int) -> dict[str, Any]:
    return {
        "rps": round(s.requests / span_s, 3),
        "error_ratio": round(s.error_ratio, 4),
        "p50_ms": _ms(s.p50_s),
        "p99_ms": _ms(s.p99_s),
    }


def _route_stats(name: str, series: RouteSeries, now: float) -> dict[str, Any]:
    history = [{"start": start, **_figures(s, 10)} for start, s in series.history(now, 10)]
    return {"name": name, **_figures(series.summary(now, 60), 60), "history": history[-30:]}


@functools.cache
def _ui_body(name: str) -> bytes:
    return resources.files("gateway.admin").joinpath("ui").joinpath(name).read_bytes()


async def ui_file(request: web.Request) -> web.StreamResponse:
    name, content_type = _UI_FILES[request.path]
    body = _ui_body(name)
    resp = web.Response(body=body, content_type=content_type, charset="utf-8")
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


async def stats(request: web.Request) -> web.StreamResponse:
    """Everything the operator page shows, as documented JSON (docs/operations.md)."""
    rt = _rt(request)
    now = time.time()
    mono = asyncio.get_running_loop().time()
    components = rt.monitor.components()
    s = rt.settings
    last = rt.last_reload
    bans = await rt.bans.list_bans()
    # the newest first, and only so many: under an attack the page is read every 2 s,
    # and the store may hold many thousands
    shown = sorted(bans, key=lambda b: b.banned_at, reverse=True)[:STATS_BANS]
    evidence = await rt.bans.evidence([b.ip for b in shown])
    allowed = await rt.allow.entries()
    return _json(
        {
            "generated_at": round(now, 3),
            "version": __version__,
            "status": str(aggregate(components.values())),
            "draining": rt.monitor.draining,
            "components": [
                {
                    "name": name,
                    "status": str(c.status),
                    "critical": c.critical,
                    "since": rt.monitor.since(name),
                    "message": c.message,
                }
                for name, c in components.items()
            ],
            "upstreams": [
                {
                    "name": name,
                    "breaker": str(up.breaker.state(mono)),
                    "inflight": up.inflight,
                    "limit": up.limit,
                    "mode": up.config.concurrency.mode,
                }
                for name, up in rt.upstreams.items()
            ],
            "routes": [
                _route_stats(name, series, now) for name, series in sorted(rt.route_series.items())
            ],
            "limited": [{"key": k, "count": n} for k, n in rt.top_limited.top(now, 10)],
            "bans_total": len(bans),
            "bans": [
                {
                    "ip": b.ip,
                    "reason": b.reason,
                    "score": b.score,
                    "expires_in_s": max(0.0, round(b.expires_at - now, 3)),
                    "evidence": [e.as_dict() for e in evidence.get(b.ip, ())],
                }
                for b in shown
            ],
            "allow": [e.as_dict(now) for e in allowed],
            "config": {
                "source": s.source,
                "generation": rt.config_generation,
                "digest": s.digest,
                "last_reload": None
                if last is None
                else {"result": last[0], "at": round(last[1], 3), "error": last[2]},
            },
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


def _field_problem(exc: EntryError) -> web.Response:
    return problem_response(
        400,
        str(exc),
        request_id=None,
        extra={"errors": [{"field": exc.field, "message": exc.message}]},
    )


def _caller(request: web.Request) -> str:
    """Who made an admin change, for its log line: the token is shared, so the
    caller's address (a trusted front proxy's, when there is one)."""
    return request.remote or "-"


_ALLOW_UNAVAILABLE = (
    "the shared allow list (Redis) is unreachable: the change was not made on any "
    "replica; try again"
)


async def allow_add(request: web.Request) -> web.StreamResponse:
    rt = _rt(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _field_problem(EntryError("body", "not valid JSON"))
    try:
        net, ttl_s, reason = check_request(body, rt.snapshot.ipv6_prefix)
    except EntryError as exc:
        return _field_problem(exc)
    try:
        entry = await rt.allow.add(net, ttl_s, reason, _caller(request))
    except AllowListFullError:
        return problem_response(
            409, "the allow list is full: remove an entry first", request_id=None
        )
    except AllowUnavailableError:
        return problem_response(503, _ALLOW_UNAVAILABLE, request_id=None)
    return _json(entry.as_dict(time.time()), status=201)


async def allow_list(request: web.Request) -> web.StreamResponse:
    now = time.time()
    entries = await _rt(request).allow.entries()
    return _json({"allow": [e.as_dict(now) for e in entries], "max_ttl_s": MAX_TTL_S})


async def allow_remove(request: web.Request) -> web.StreamResponse:
    rt = _rt(request)
    try:
        net: IPNetwork = parse_target(request.match_info["ip"], rt.snapshot.ipv6_prefix)
    except EntryError as exc:
        return _field_problem(exc)
    try:
        entry = await rt.allow.remove(net, _caller(request))
    except AllowUnavailableError:
        return problem_response(503, _ALLOW_UNAVAILABLE, request_id=None)
    if entry is None:
        return problem_response(404, f"{net} has no allow entry", request_id=None)
    return _json({"removed": entry.ip})


async def reload(request: web.Request) -> web.StreamResponse:
    reloader = request.app[RELOADER]
    ok, errors = await reloader.reload("admin")
    return _json({"reloaded": ok, "errors": errors}, status=200 if ok else 422)


class _BadQueryError(Exception):
    """A query parameter of /admin/explain is not usable; the message says which."""


def _single(q: Any, name: str, default: str) -> str:
    values: list[str] = q.getall(name, [])
    if len(values) > 1:
        msg = f"query parameter {name} is given more than once"
        raise _BadQueryError(msg)
    return values[0] if values else default


def _explain_args(q: Any) -> tuple[str, str, str, CIMultiDict[str]]:
    """(ip, path, method, headers) of an explain query, each checked as a request would be."""
    ip = _single(q, "ip", "")
    path = _single(q, "path", "/")
    method = _single(q, "method", "GET").upper()
    if not path.startswith("/") or _FIELD_VALUE_BAD.search(path):
        msg = "query parameter path must start with '/' and hold no control character"
        raise _BadQueryError(msg)
    if not _TOKEN_RE.match(method):
        msg = "query parameter method must be an HTTP method"
        raise _BadQueryError(msg)
    headers: CIMultiDict[str] = CIMultiDict()
    for h in q.getall("header", []):
        name, sep, value = h.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _TOKEN_RE.match(name) or _FIELD_VALUE_BAD.search(value):
            msg = "query parameter header must be Name:Value (a field name, a field value)"
            raise _BadQueryError(msg)
        headers.add(name, value)
    return ip, path, method, headers


async def explain(request: web.Request) -> web.StreamResponse:
    try:
        raw_ip, path, method, headers = _explain_args(request.query)
    except _BadQueryError as exc:
        return problem_response(400, str(exc), request_id=None)
    ip = parse_ip(raw_ip)
    if ip is None:
        return problem_response(400, "query parameter ip must be an IP address", request_id=None)
    body_values: list[str] = request.query.getall("body", [])
    if len(body_values) > 1:
        return problem_response(
            400, "query parameter body is given more than once", request_id=None
        )
    body = body_values[0].encode("utf-8", "surrogatepass") if body_values else None
    result = await explain_request(_rt(request), ip, path, method, headers, body=body)
    return _json(result)


class _ErrorAnswer(web.Response):
    """An answer of the connection handler itself: it goes out without the app's
    on_response_prepare, so it is hardened here, after aiohttp has added its fields."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        _harden(self.headers, ui=False)


class _AdminProtocol(RequestHandler):
    """aiohttp's connection handler whose own errors (a request the parser refuses, a
    handler that failed) are problem+json without the request echoed, and whose parse
    errors log no traceback: a client can send any bytes, that is not our error."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,  # noqa: ARG002 - aiohttp's signature
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            msg = "response already started"
            raise ConnectionError(msg)
        status, detail = server_error_answer(status, exc)
        if status >= 500:  # a bug of ours: worth its traceback
            self.log_exception("Error handling request", exc_info=exc)
        resp = _ErrorAnswer(
            status=status,
            body=problem_body(status, detail, request_id=None),
            content_type=CONTENT_TYPE,
        )
        resp.force_close()
        return resp


class _AdminServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _AdminProtocol(self, loop=self._loop, **self._kwargs)


class AdminRunner(web.AppRunner):
    """``web.AppRunner`` serving with :class:`_AdminProtocol`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _AdminServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,  # the loop and options AppRunner set up
            **server._kwargs,
        )


def create_admin_app(runtime: Runtime, reloader: Reloader) -> web.Application:
    """The admin port's application (explicit factory; no global state)."""
    app = web.Application(middlewares=[_problems, _auth])
    app[RUNTIME] = runtime
    app[RELOADER] = reloader
    app[GUARD] = AdminAuthGuard(runtime.metrics, runtime.log)
    app.on_response_prepare.append(_on_prepare)
    r = app.router
    r.add_get("/metrics", metrics)
    for path in ("/livez", "/readyz", "/startupz", "/healthz", "/readyz/{name}"):
        r.add_get(path, probe)
    r.add_get("/admin/config", config)
    r.add_get("/admin/bans", bans)
    r.add_delete("/admin/bans/{ip:.+}", unban)  # an address, or a prefix as listed
    r.add_post("/admin/reload", reload)
    r.add_get("/admin/allow", allow_list)
    r.add_post("/admin/allow", allow_add)
    r.add_delete("/admin/allow/{ip:.+}", allow_remove)  # an address, or a prefix
    r.add_get("/admin/explain", explain)
    r.add_get("/admin/stats", stats)
    for path in _UI_FILES:
        r.add_get(path, ui_file)
    return app
