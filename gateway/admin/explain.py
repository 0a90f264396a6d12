"""``/admin/explain``: what the gateway would do with a request, and why, counting nothing.

It walks the pipeline's own decisions (:mod:`gateway.pipeline.decisions`) in the
pipeline's order, so its verdict is the answer a request would get; it goes on past the
first refusal to report what else it finds.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs

from gateway.core.framing import FramingError, request_host
from gateway.identity.body import NO_BODY, is_json_media_type, parse_body
from gateway.pipeline import decisions
from gateway.pipeline.reject import (
    Reject,
    banned,
    bulkhead_full,
    circuit_open,
    too_many_in_flight,
)

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from gateway.core.client_ip import IPAddress
    from gateway.identity.resolver import RequestIdentity
    from gateway.pipeline.snapshot import CompiledRoute
    from gateway.runtime import Runtime


def _host(path: str, headers: CIMultiDict[str]) -> str | None:
    """The host the request is for, read as the HTTP/1.1 server reads it."""
    try:
        return request_host("1.1", headers.getall(hdrs.HOST, []), path)
    except FramingError:
        return None


def _content_length(headers: CIMultiDict[str]) -> int | None:
    value = headers.get(hdrs.CONTENT_LENGTH)
    return int(value) if value is not None and value.isdigit() else None


def _body_document(headers: CIMultiDict[str], body: bytes | None) -> Any:
    """The parsed JSON body a ``json:`` key would be read from: as for a request, only
    with a JSON media type (assumed when no Content-Type is given) and a small body."""
    if body is None:
        return NO_BODY
    content_type = headers.get(hdrs.CONTENT_TYPE)
    if content_type is not None and not is_json_media_type(content_type):
        return NO_BODY
    return parse_body(body)


async def explain_request(
    rt: Runtime,
    ip: IPAddress,
    path: str,
    method: str,
    headers: CIMultiDict[str],
    *,
    body: bytes | None = None,
) -> dict[str, Any]:
    """Walk the pipeline's decisions for a hypothetical request without side effects.

    ``path`` is a target as a client would send it; ``headers`` hold the field values
    decoded as UTF-8 (they are keyed in their wire form, as a request's are); ``body``
    the request's body (None: none), read for ``json:`` keys.
    """
    snap = rt.snapshot
    ip_str = str(ip)
    client_key = decisions.client_key(snap, ip, ip_str)
    out: dict[str, Any] = {
        "client_ip": ip_str,
        "client_key": client_key,
        "method": method,
        "path": path,
    }
    verdict: str | None = None

    def stop(rej: Reject) -> None:
        nonlocal verdict
        if verdict is None:
            verdict = f"{rej.status}: {rej.detail}"

    exempt = False
    try:
        exempt = decisions.check_lists(snap, ip, rt.allow, count=False)
    except Reject as rej:
        stop(rej)
    out["denied"] = snap.has_deny and ip in snap.deny
    out["allow_listed"] = snap.has_allow and ip in snap.allow
    entry = rt.allow.covers(ip)
    out["break_glass"] = None if entry is None else entry.as_dict(time.time())
    ban = rt.bans.banned(client_key)
    out["ban"] = (
        None
        if ban is None
        else {"reason": ban.reason, "expires_at": ban.expires_at, "offences": ban.offences}
    )
    out["abuse_score"] = rt.bans.score(client_key)
    if ban is not None and not out["allow_listed"] and entry is None:
        stop(banned(snap, ban.expires_at))
    underscored = [name for name in headers if "_" in name]
    if underscored:
        out["underscore_fields"] = {"names": underscored, "action": snap.underscores}
    header_bytes = sum(len(k) + len(v) + 4 for k, v in headers.items())
    try:
        decisions.check_head(
            snap,
            header_bytes,
            _host(path, headers) if snap.allowed_hosts else None,
            headers.items(),
        )
        decisions.check_method(method)
    except Reject as rej:
        stop(rej)
    try:
        canon = decisions.canonical_target(path)
    except Reject as rej:
        out["canonical_path"] = None
        stop(rej)
        out["verdict"] = verdict
        return out
    out["canonical_path"] = canon
    key = canon.lower()
    out["suspicious_path"] = snap.suspicious.matches(key)
    try:
        route = decisions.route_for(snap, key, path)
    except Reject as rej:
        out["route"] = None
        stop(rej)
        out["verdict"] = verdict
        return out
    out["route"] = route.name
    out["upstream"] = route.upstream
    out["cost"] = route.cost
    secret = decisions.secret_state(route, headers)
    if secret is not None:
        out["shared_secret"] = secret
    try:
        decisions.guard_route(route, method, ip, headers)
    except Reject as rej:
        stop(rej)
    ident = decisions.identify(
        snap, route, headers, client=client_key, failures=rt.verify_failures, spend=False
    )
    if route.needs_identity:
        out["identity"] = ident.label
        out["plan"] = ident.plan
        try:
            decisions.check_auth(route, ident)
        except Reject as rej:
            stop(rej)
    document = _body_document(headers, body) if route.needs_body else NO_BODY
    if route.needs_body:
        out["json_body"] = (
            "none" if body is None else ("read" if document is not NO_BODY else "unread")
        )
    out["policies"] = await _policies(
        rt, out, route, client_key, headers, ident=ident, body=document, exempt=exempt, stop=stop
    )
    try:
        decisions.check_size(snap, _content_length(headers))
    except Reject as rej:
        stop(rej)
    if route.inflight:  # counted after the checks above, as the pipeline does
        out["concurrency_policies"] = _inflight_policies(
            rt, route, client_key, headers, exempt=exempt, stop=stop
        )
    up = snap.upstreams.get(route.upstream)
    if up is not None:
        now = asyncio.get_running_loop().time()
        state = up.breaker.state(now)
        out["breaker"] = str(state)
        out["inflight"] = up.inflight
        refused = not up.admits(route.priority, reserved=route.reserved)
        out["concurrency"] = {
            "mode": up.config.concurrency.mode,
            "limit": up.limit,
            "max_inflight": up.max_inflight,
            "inflight": up.inflight,
            "critical_inflight": up.critical_inflight,
            "priority": route.priority_name,
            "would_refuse": refused,
        }
        if refused:  # the upstream leg checks the limit before the breaker
            stop(bulkhead_full(up, "requests in flight"))
        if str(state) == "open":
            stop(circuit_open(up, now))
    out["verdict"] = verdict or f"proxied to upstream {route.upstream!r}"
    return out


def _inflight_policies(
    rt: Runtime,
    route: CompiledRoute,
    client_key: str,
    headers: CIMultiDict[str],
    *,
    exempt: bool,
    stop: Any,
) -> list[dict[str, Any]]:
    """Each concurrency policy of the route: the key, its requests in flight (open
    WebSockets included) and whether the next one would be refused."""
    out: list[dict[str, Any]] = []
    for pol in route.inflight:
        try:
            key = decisions.policy_key_of(pol, route, client_key, headers, decoded=True)
        except Reject as rej:
            stop(rej)
            continue
        inflight = rt.inflight_keys.count(pol.name, key)
        full = inflight >= pol.limit
        if full and not pol.shadow and not exempt:
            stop(too_many_in_flight(pol.name))
        out.append(
            {
                "policy": pol.name,
                "key": key,
                "mode": "shadow" if pol.shadow else "enforce",
                "max_inflight": pol.limit,
                "inflight": inflight,
                "would_refuse": full and not pol.shadow and not exempt,
                "exempt": exempt,
            }
        )
    return out


async def _policies(
    rt: Runtime,
    out: dict[str, Any],
    route: CompiledRoute,
    client_key: str,
    headers: CIMultiDict[str],
    *,
    ident: RequestIdentity,
    body: Any,
    exempt: bool,
    stop: Any,
) -> list[dict[str, Any]]:
    """Each policy's budget as the limiter would decide it now (peeked, not spent)."""
    if not route.policies:
        return []
    try:
        applied, checks = decisions.policy_checks(
            route, client_key, headers, decoded=True, ident=ident, body=body
        )
    except Reject as rej:
        stop(rej)
        return []
    try:
        found = await rt.limiter.peek(checks)
    except Exception as exc:  # the backend may be down: say so
        out["ratelimit_error"] = str(exc)
        return []
    if not exempt:
        refused, _ = decisions.limit_outcome(applied, found, rt.limiter.wall_clock)
        if refused is not None:
            stop(refused)
    return [
        {
            "policy": p.name,
            "key": c.key,
            "mode": "shadow" if p.shadow else "enforce",
            "would_allow": d.allowed,
            "remaining": d.remaining,
            "retry_after_s": round(d.retry_after_s, 3),
            "exempt": exempt,
        }
        for p, c, d in zip(applied, checks, found, strict=False)
    ]
