"""``/admin/explain``: what the gateway would do with a request, and why, counting nothing."""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from gateway.core.keys import policy_key, wire_form
from gateway.core.paths import PathError, canonical_path
from gateway.stores.limiter import Check

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.pipeline.client_ip import IPAddress
    from gateway.runtime import Runtime


async def explain_request(
    rt: Runtime, ip: IPAddress, path: str, method: str, headers: Mapping[str, str]
) -> dict[str, Any]:
    """Walk the pipeline's decisions for a hypothetical request without side effects."""
    snap = rt.snapshot
    ip_str = str(ip)
    client_key = snap.ip_key(ip, ip_str)  # its scores, bans and limits (IPv6: its prefix)
    out: dict[str, Any] = {
        "client_ip": ip_str,
        "client_key": client_key,
        "method": method,
        "path": path,
    }
    verdict: str | None = None

    def stop(status: int, why: str) -> None:
        nonlocal verdict
        if verdict is None:
            verdict = f"{status}: {why}"

    denied = bool(snap.deny) and ip in snap.deny
    exempt = bool(snap.allow) and ip in snap.allow
    out["denied"] = denied
    out["allow_listed"] = exempt
    if denied:
        stop(403, "client address is in deny_cidrs")
    ban = rt.bans.banned(client_key)
    out["ban"] = (
        None
        if ban is None
        else {"reason": ban.reason, "expires_at": ban.expires_at, "offences": ban.offences}
    )
    out["abuse_score"] = rt.bans.score(client_key)
    if ban is not None and not exempt:
        stop(snap.ban_status, f"client is banned ({ban.reason})")
    underscored = [name for name in headers if "_" in name]
    if underscored:
        out["underscore_fields"] = {"names": underscored, "action": snap.underscores}
        if snap.underscores == "reject":
            stop(400, "a header field name holds an underscore")
    # ``path`` is a target as a client would send it: read as the pipeline reads it
    try:
        canon = canonical_path(path)
    except PathError as exc:
        out["canonical_path"] = None
        stop(400, str(exc))
        out["verdict"] = verdict
        return out
    out["canonical_path"] = canon
    key = canon.lower()
    out["suspicious_path"] = snap.suspicious(key)
    route = snap.match(key)
    out["route"] = route.name if route else None
    if route is None:
        stop(404, "no route matches")
        out["verdict"] = verdict
        return out
    out["upstream"] = route.upstream
    if route.methods is not None and method not in route.methods:
        stop(405, f"method not in {sorted(route.methods)}")
    elif route.methods is None and method == "TRACE":
        stop(405, "TRACE is refused unless the route lists it in methods")
    if route.sources is not None and ip not in route.sources:
        stop(403, "client address not in the route's source_cidrs")
    if route.secret_header is not None:
        given = headers.get(route.secret_header)
        ok = (
            route.secret is not None
            and given is not None
            and hmac.compare_digest(given.encode(), route.secret)
        )
        out["shared_secret"] = "valid" if ok else ("missing" if given is None else "wrong")
        if not ok:
            stop(403, "missing or wrong shared secret")
    policies = []
    if route.policies:
        checks = []
        for p in route.policies:
            value = wire_form(headers.get(p.header, "")) if p.header else None
            key = policy_key(p.key, client_key, route.name, p.header, value)
            checks.append(Check(p.name, p.rate, key))
        try:
            decisions = await rt.limiter.peek(checks)
        except Exception as exc:  # the backend may be down: say so
            decisions = []
            out["ratelimit_error"] = str(exc)
        for p, c, d in zip(route.policies, checks, decisions, strict=False):
            policies.append(
                {
                    "policy": p.name,
                    "key": c.key,
                    "mode": "shadow" if p.shadow else "enforce",
                    "would_allow": d.allowed,
                    "remaining": d.remaining,
                    "retry_after_s": round(d.retry_after_s, 3),
                    "exempt": exempt,
                }
            )
            if not d.allowed and not p.shadow and not exempt:
                stop(429, f"policy {p.name} has no budget left")
    out["policies"] = policies
    up = snap.upstreams.get(route.upstream)
    if up is not None:
        now = asyncio.get_running_loop().time()
        state = up.breaker.state(now)
        out["breaker"] = str(state)
        out["inflight"] = up.inflight
        if str(state) == "open":
            stop(503, "circuit open")
    out["verdict"] = verdict or f"proxied to upstream {route.upstream!r}"
    return out
