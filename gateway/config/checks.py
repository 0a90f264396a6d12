"""Rules across fields, on plain data, and the settings ``check-config --strict`` refuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.config.errors import Problem
from gateway.config.models import (
    Abuse,
    Admin,
    Config,
    Listen,
    Retries,
    default_policies,
    default_routes,
    default_upstreams,
)

__all__ = ["cross_check", "risky_settings"]


def _section(data: Any, key: str) -> Any:
    """``data[key]`` when ``data`` is a mapping, else None (its type error is reported)."""
    return data.get(key) if isinstance(data, dict) else None


def _number(value: Any, default: float) -> float | None:
    """A number as validation would read it (``"10"`` is 10); None when it is not one."""
    if value is None:
        return default
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _names(value: Any, default: Mapping[str, Any]) -> set[str] | None:
    """The keys of a mapping of named entries (the defaults when absent); None if not one."""
    if value is None:
        return set(default)
    return {str(k) for k in value} if isinstance(value, dict) else None


def _route_problems(
    routes: list[Any] | tuple[Any, ...],
    upstreams: set[str] | None,
    policies: set[str] | None,
    underscores: Any,
) -> list[Problem]:
    """References and guard settings of each route (plain data, as in :func:`cross_check`)."""
    problems: list[Problem] = []
    if not routes:
        problems.append(Problem("routes", "at least one route is needed"))
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(Problem(f"routes[{i}].name", f"duplicate route name {name!r}"))
            seen.add(name)
        upstream = route.get("upstream")
        if upstreams is not None and isinstance(upstream, str) and upstream not in upstreams:
            problems.append(
                Problem(
                    f"routes[{i}].upstream",
                    f"unknown upstream {upstream!r}"
                    f" (known: {', '.join(sorted(upstreams)) or 'none'})",
                )
            )
        secret = _section(route, "shared_secret")
        header = _section(secret, "header")
        if isinstance(header, str) and "_" in header and underscores == "reject":
            problems.append(
                Problem(
                    f"routes[{i}].shared_secret.header",
                    f"{header!r} holds '_', and request.headers_with_underscores: "
                    "reject refuses every request that sends it",
                )
            )
        limits = route.get("rate_limits")
        if policies is None or not isinstance(limits, list | tuple):
            continue
        for j, pol in enumerate(limits):
            if isinstance(pol, str) and pol not in policies:
                problems.append(
                    Problem(
                        f"routes[{i}].rate_limits[{j}]",
                        f"unknown policy {pol!r} (known: {', '.join(sorted(policies)) or 'none'})",
                    )
                )
    return problems


def _underscore_key_problems(data: Mapping[str, Any]) -> list[Problem]:
    """A policy keyed on a field named with ``_`` under ``reject``: every request that
    sends the field is refused, so the policy never sees it (as for a shared secret)."""
    if _section(data.get("request"), "headers_with_underscores") != "reject":
        return []
    policies = _section(data.get("rate_limit"), "policies")
    if not isinstance(policies, dict):
        return []
    problems: list[Problem] = []
    for name, pol in policies.items():
        key = _section(pol, "key")
        if isinstance(key, str) and key.startswith("header:") and "_" in key:
            header = key.removeprefix("header:").strip()
            problems.append(
                Problem(
                    f"rate_limit.policies.{name}.key",
                    f"{header!r} holds '_', and request.headers_with_underscores: "
                    "reject refuses every request that sends it",
                )
            )
    return problems


def _is_identity_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "api_key" or key.startswith(("jwt:", "json:")))


def _identity_problems(data: Mapping[str, Any]) -> list[Problem]:
    """``fallback`` names a policy not keyed by identity; identity keys and route ``auth``
    need their part of the ``identity`` section (SPEC 11)."""
    problems: list[Problem] = []
    identity = _section(data, "identity")
    has_jwt = isinstance(_section(identity, "jwt"), dict)
    has_keys = isinstance(_section(identity, "api_keys"), dict)
    policies = _section(data.get("rate_limit"), "policies")
    if isinstance(policies, dict):
        for name, pol in policies.items():
            key = _section(pol, "key")
            where = f"rate_limit.policies.{name}"
            if isinstance(key, str) and key.startswith("jwt:") and not has_jwt:
                problems.append(Problem(f"{where}.key", f"{key!r} needs identity.jwt"))
            if key == "api_key" and not has_keys:
                problems.append(Problem(f"{where}.key", "'api_key' needs identity.api_keys"))
            plans = _section(pol, "requests_by_plan")
            has_plan_claim = _section(_section(identity, "jwt"), "plan_claim") is not None
            if isinstance(plans, dict) and plans and not (has_plan_claim or has_keys):
                problems.append(
                    Problem(
                        f"{where}.requests_by_plan",
                        "a plan comes from identity.jwt.plan_claim or identity.api_keys:"
                        " neither is set",
                    )
                )
            if _section(pol, "max_inflight") is not None and _is_identity_key(key):
                problems.append(
                    Problem(
                        f"{where}.key", "a concurrency policy takes ip, route, ip_route or header:"
                    )
                )
            fallback = _section(pol, "fallback")
            if fallback is None:
                continue
            target = policies.get(fallback) if isinstance(fallback, str) else None
            if not isinstance(target, dict):
                problems.append(Problem(f"{where}.fallback", f"unknown policy {fallback!r}"))
            elif target.get("max_inflight") is not None:
                problems.append(
                    Problem(
                        f"{where}.fallback",
                        f"{fallback!r} is a concurrency policy: a fallback limits a rate",
                    )
                )
            elif _is_identity_key(target.get("key")):
                problems.append(
                    Problem(
                        f"{where}.fallback",
                        f"{fallback!r} is keyed by identity ({target.get('key')}):"
                        " a fallback must not be",
                    )
                )
    routes = data.get("routes")
    if isinstance(routes, list | tuple):
        for i, route in enumerate(routes):
            auth = _section(route, "auth")
            if auth in ("jwt", "any") and not has_jwt and not (auth == "any" and has_keys):
                problems.append(Problem(f"routes[{i}].auth", f"{auth!r} needs identity.jwt"))
            if auth == "api_key" and not has_keys:
                problems.append(Problem(f"routes[{i}].auth", "'api_key' needs identity.api_keys"))
    return problems


def cross_check(data: Mapping[str, Any]) -> list[Problem]:
    """Rules across fields (references between sections, orders between values).

    They run on plain data, the raw YAML or a validated config's dump: when type
    validation fails the operator still sees these errors in the same run.  A part with
    the wrong shape is skipped here (validation reports it).
    """
    problems: list[Problem] = []
    upstreams_raw = data.get("upstreams")
    upstreams = _names(upstreams_raw, default_upstreams())
    policies = _names(_section(data.get("rate_limit"), "policies"), default_policies())
    routes = data.get("routes")
    if routes is None:  # absent: the default route (whose upstream is 'api')
        routes = [r.model_dump() for r in default_routes()]
    if isinstance(routes, list | tuple):
        underscores = _section(data.get("request"), "headers_with_underscores")
        problems.extend(_route_problems(routes, upstreams, policies, underscores))
    problems.extend(_underscore_key_problems(data))
    problems.extend(_identity_problems(data))
    abuse = data.get("abuse") or {}
    if isinstance(abuse, dict):
        ban_s = _number(abuse.get("ban_s"), Abuse.model_fields["ban_s"].default)
        max_ban_s = _number(abuse.get("max_ban_s"), Abuse.model_fields["max_ban_s"].default)
        if ban_s is not None and max_ban_s is not None and max_ban_s < ban_s:
            problems.append(Problem("abuse.max_ban_s", "must be >= abuse.ban_s"))
    if isinstance(upstreams_raw, dict):
        for name, up in upstreams_raw.items():
            retries = _section(up, "retries") or {}
            if not isinstance(retries, dict):
                continue
            backoff = _number(retries.get("backoff_s"), Retries.model_fields["backoff_s"].default)
            backoff_max = _number(
                retries.get("backoff_max_s"), Retries.model_fields["backoff_max_s"].default
            )
            if backoff is not None and backoff_max is not None and backoff_max < backoff:
                problems.append(
                    Problem(f"upstreams.{name}.retries.backoff_max_s", "must be >= backoff_s")
                )
    checks = _section(data.get("database"), "checks")
    if isinstance(checks, list | tuple):
        names = [_section(c, "name") for c in checks]
        for i, n in enumerate(names):
            if isinstance(n, str) and names.index(n) != i:
                problems.append(Problem(f"database.checks[{i}].name", f"duplicate {n!r}"))
    listen_port = _number(_section(data.get("listen"), "port"), Listen.model_fields["port"].default)
    admin_port = _number(_section(data.get("admin"), "port"), Admin.model_fields["port"].default)
    if listen_port is not None and listen_port == admin_port:
        problems.append(Problem("admin.port", "must differ from listen.port"))
    return problems


def risky_settings(cfg: Config) -> list[Problem]:
    """Settings that serve, but that ``check-config --strict`` refuses."""
    out = []
    for i, net in enumerate(cfg.trusted_proxies):
        if net.prefixlen == 0:
            out.append(
                Problem(
                    f"trusted_proxies[{i}]",
                    f"{net} trusts every address: any client can forge its IP",
                    risky=True,
                )
            )
    if cfg.metrics.on_proxy_port:
        out.append(
            Problem(
                "metrics.on_proxy_port",
                "metrics are served to every client on the proxy port",
                risky=True,
            )
        )
    if not cfg.security_headers.enabled:
        out.append(Problem("security_headers.enabled", "security headers are off", risky=True))
    if cfg.rate_limit.on_backend_error == "allow":
        out.append(
            Problem(
                "rate_limit.on_backend_error",
                "'allow' lifts every limit while the backend is down",
                risky=True,
            )
        )
    return out
