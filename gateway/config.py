"""The gateway's configuration: one typed, frozen, validated object.

The schema is the contract of SPEC section 3.  Every field has a default, unknown
keys are errors, and every error carries its field path (``routes[1].upstream``).
Secrets never live in the file: fields ending in ``_env`` name an environment
variable, resolved once at load time into :class:`Secrets`, kept apart from the
config so that dumping the config can never leak one.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from gateway.core.framing import parse_host_entry
from gateway.core.paths import PathError, canonical_path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD_RE = re.compile(r"^[A-Z]+$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

PositiveSeconds = Annotated[float, Field(gt=0)]
NonNegativeSeconds = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(ge=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
EnvName = Annotated[str, Field(pattern=_ENV_RE.pattern)]
HeaderName = Annotated[str, Field(pattern=_TOKEN_RE.pattern, max_length=256)]
# compared with the Host of each request in the form both are read in (lower-case, no
# trailing dot, IPv6 without brackets)
HostName = Annotated[str, AfterValidator(parse_host_entry)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


def _canonical(path: str) -> str:
    """``path`` as requests are matched against it (SPEC 9: the canonical path)."""
    try:
        return canonical_path(path)
    except PathError as exc:
        msg = f"{path!r}: {exc}"
        raise ValueError(msg) from None


def _parse_networks(value: Any) -> Any:
    """Parse CIDRs (a bare address means a /32 or /128); host bits set are an error."""
    if not isinstance(value, list):
        return value
    out: list[IPNetwork] = []
    for item in value:
        if not isinstance(item, str):
            msg = f"expected a CIDR string, got {item!r}"
            raise ValueError(msg)  # noqa: TRY004 - pydantic turns ValueError into a field error
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            msg = f"invalid CIDR {item!r}: {exc}"
            raise ValueError(msg) from None
    return out


class Listen(_Model):
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar listens on the pod's interfaces
    port: Port = 8000


class Admin(_Model):
    host: str = "0.0.0.0"  # noqa: S104
    port: Port = 9901
    token_env: EnvName | None = "GATEWAY_ADMIN_TOKEN"


class RequestLimits(_Model):
    max_body_bytes: Annotated[int, Field(ge=0)] = 10_485_760
    max_header_bytes: Annotated[int, Field(ge=1024, le=1_048_576)] = 16_384
    client_timeout_s: PositiveSeconds = 60
    # a body up to this size is read whole before an upstream connection is taken
    buffer_body_bytes: Annotated[int, Field(ge=0)] = 1_048_576
    # bytes held that way by all requests at once; past it, 503
    max_buffered_bytes: Annotated[int, Field(ge=0)] = 67_108_864
    # a streamed body (or an answer the client stops taking) idle this long ends the exchange
    body_idle_s: PositiveSeconds = 10
    request_id_header: HeaderName = "X-Request-ID"
    # a field name holding "_" (X_Forwarded_For): CGI and WSGI servers read it as the "-"
    # field; drop: not passed upstream, allow: passed (but never an alias of a field the
    # gateway sets), reject: 400
    headers_with_underscores: Literal["drop", "allow", "reject"] = "drop"

    @field_validator("max_buffered_bytes")
    @classmethod
    def _room_for_one(cls, v: int, info: ValidationInfo) -> int:
        one = info.data.get("buffer_body_bytes")
        if one is not None and v < one:
            msg = f"must be at least request.buffer_body_bytes ({one}): no body could be buffered"
            raise ValueError(msg)
        return v


class HealthCheck(_Model):
    path: str = "/health"
    interval_s: PositiveSeconds = 5
    timeout_s: PositiveSeconds = 2
    healthy_threshold: PositiveInt = 2
    unhealthy_threshold: PositiveInt = 3
    critical: bool = True

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            msg = "must start with '/'"
            raise ValueError(msg)
        return v


class CircuitBreaker(_Model):
    consecutive_failures: PositiveInt = 5
    failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_requests: PositiveInt = 20
    window_s: PositiveSeconds = 30
    open_s: PositiveSeconds = 30
    half_open_requests: PositiveInt = 3
    failure_statuses: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (502, 503, 504)
    slow_call_s: PositiveSeconds | None = None


class Retries(_Model):
    attempts: PositiveInt = 2
    backoff_s: NonNegativeSeconds = 0.05
    backoff_max_s: NonNegativeSeconds = 1.0
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2


class Upstream(_Model):
    url: str
    connect_timeout_s: PositiveSeconds = 2
    timeout_s: PositiveSeconds = 30
    max_connections: PositiveInt = 100
    max_inflight: PositiveInt = 500
    # a bigger response head, or one of over 100 fields, is a 502 (never relayed)
    max_response_header_bytes: Annotated[int, Field(ge=1024, le=1_048_576)] = 65_536
    health: HealthCheck = HealthCheck()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    retries: Retries = Retries()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from yarl import URL  # noqa: PLC0415 - only needed while validating

        try:
            url = URL(v)
        except (ValueError, TypeError) as exc:
            msg = f"invalid URL {v!r}: {exc}"
            raise ValueError(msg) from None
        if url.scheme not in ("http", "https") or not url.host:
            msg = f"must be an http:// or https:// URL with a host, got {v!r}"
            raise ValueError(msg)
        if url.path not in ("", "/") or url.query_string or url.fragment:
            msg = "must have no path, query or fragment (the client's path is sent as it is)"
            raise ValueError(msg)
        return str(url.origin())


class SharedSecret(_Model):
    header: HeaderName
    value_env: EnvName


class Route(_Model):
    name: Annotated[str, Field(pattern=_NAME_RE.pattern)]
    path_prefix: str = "/"
    upstream: str
    methods: tuple[str, ...] | None = None
    source_cidrs: tuple[IPNetwork, ...] | None = None
    shared_secret: SharedSecret | None = None
    rate_limits: tuple[str, ...] = ()

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            msg = "must start with '/'"
            raise ValueError(msg)
        return _canonical(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        if not v:
            msg = "must list at least one method (omit the field to allow any)"
            raise ValueError(msg)
        for m in v:
            if not _METHOD_RE.match(m):
                msg = f"{m!r} is not an upper-case HTTP method (methods are case-sensitive)"
                raise ValueError(msg)
        return v

    @field_validator("source_cidrs", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        return _parse_networks(v)


class Policy(_Model):
    requests: PositiveInt
    period_s: PositiveSeconds
    burst: PositiveInt | None = None
    key: str = "ip"
    mode: Literal["enforce", "shadow"] = "enforce"

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v in ("ip", "route", "ip_route"):
            return v
        if v.startswith("header:") and _TOKEN_RE.match(v[7:]):
            return v
        msg = f"must be ip, route, ip_route or header:NAME, got {v!r}"
        raise ValueError(msg)

    @property
    def effective_burst(self) -> int:
        return self.burst if self.burst is not None else self.requests


def _default_policies() -> dict[str, Policy]:
    return {"per-ip": Policy(requests=100, period_s=1, burst=200, key="ip")}


def _default_upstreams() -> dict[str, Upstream]:
    return {"api": Upstream(url="http://127.0.0.1:8080")}


def _default_routes() -> tuple[Route, ...]:
    return (Route(name="default", path_prefix="/", upstream="api", rate_limits=("per-ip",)),)


class RateLimit(_Model):
    backend: Literal["memory", "redis"] = "memory"
    redis_url_env: EnvName = "GATEWAY_REDIS_URL"
    on_backend_error: Literal["local", "allow", "deny"] = "local"
    ipv6_prefix: Annotated[int, Field(ge=1, le=128)] = 64
    max_keys: Annotated[int, Field(ge=1000)] = 1_000_000
    policies: dict[str, Policy] = Field(default_factory=_default_policies)


class AbuseScores(_Model):
    rate_limited: Annotated[float, Field(ge=0)] = 1
    not_found: Annotated[float, Field(ge=0)] = 1
    auth_failure: Annotated[float, Field(ge=0)] = 3
    bad_request: Annotated[float, Field(ge=0)] = 2
    suspicious_path: Annotated[float, Field(ge=0)] = 25


class Abuse(_Model):
    enabled: bool = True
    window_s: PositiveSeconds = 60
    ban_score: Annotated[float, Field(gt=0)] = 50
    scores: AbuseScores = AbuseScores()
    suspicious_paths: tuple[str, ...] = (
        "/.env",
        "/.git/",
        "/wp-admin",
        "/wp-login.php",
        "/phpmyadmin",
    )
    ban_s: PositiveSeconds = 600

    @field_validator("suspicious_paths")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not p.startswith("/"):
                msg = f"{p!r} must start with '/'"
                raise ValueError(msg)
        return tuple(_canonical(p) for p in v)

    ban_multiplier: Annotated[float, Field(ge=1)] = 2
    max_ban_s: PositiveSeconds = 86_400
    ban_status: Annotated[int, Field(ge=400, le=599)] = 403
    mode: Literal["enforce", "shadow"] = "enforce"


class Hsts(_Model):
    max_age_s: Annotated[int, Field(ge=0)] = 31_536_000
    include_subdomains: bool = True


def _default_security_headers() -> dict[str, str]:
    return {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    }


class SecurityHeaders(_Model):
    enabled: bool = True
    override: bool = False
    hsts: Hsts = Hsts()
    set: dict[HeaderName, str] = Field(default_factory=_default_security_headers)
    remove: tuple[HeaderName, ...] = ("Server", "X-Powered-By")

    @field_validator("set")
    @classmethod
    def _values(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if any(c in value for c in "\r\n\0"):
                msg = f"value of {name!r} contains a control character"
                raise ValueError(msg)
        return v


class DatabaseCheck(_Model):
    name: Annotated[str, Field(pattern=_NAME_RE.pattern)]
    query: str
    degraded_above: float | None = None
    unhealthy_above: float | None = None


class Database(_Model):
    dsn_env: EnvName = "GATEWAY_DATABASE_URL"
    critical: bool = False
    interval_s: PositiveSeconds = 10
    timeout_s: PositiveSeconds = 2
    degraded_latency_ms: Annotated[float, Field(ge=0)] = 100
    required_tables: tuple[str, ...] = ()
    checks: tuple[DatabaseCheck, ...] = ()


class RedisHealth(_Model):
    critical: bool = False
    interval_s: PositiveSeconds = 5
    timeout_s: PositiveSeconds = 1


class Liveness(_Model):
    max_event_loop_lag_s: PositiveSeconds = 5


class Drain(_Model):
    delay_s: NonNegativeSeconds = 5
    timeout_s: NonNegativeSeconds = 25


class Reload(_Model):
    interval_s: PositiveSeconds = 5


class AccessLog(_Model):
    enabled: bool = True
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 1.0


class Metrics(_Model):
    on_proxy_port: bool = False


class WebSocket(_Model):
    idle_timeout_s: PositiveSeconds = 300  # no message either way for this long -> 1001
    max_per_client: PositiveInt = 32  # open WebSockets of one client key; more -> 503


class Config(_Model):
    """The whole configuration (SPEC section 3)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="Gateway configuration",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    listen: Listen = Listen()
    admin: Admin = Admin()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    allowed_hosts: tuple[HostName, ...] = ()
    allow_cidrs: tuple[IPNetwork, ...] = ()
    deny_cidrs: tuple[IPNetwork, ...] = ()
    request: RequestLimits = RequestLimits()
    upstreams: dict[Annotated[str, Field(pattern=_NAME_RE.pattern)], Upstream] = Field(
        default_factory=_default_upstreams
    )
    routes: tuple[Route, ...] = Field(default_factory=_default_routes)
    rate_limit: RateLimit = RateLimit()
    abuse: Abuse = Abuse()
    security_headers: SecurityHeaders = SecurityHeaders()
    database: Database | None = None
    redis_health: RedisHealth = RedisHealth()
    liveness: Liveness = Liveness()
    drain: Drain = Drain()
    reload: Reload = Reload()
    access_log: AccessLog = AccessLog()
    metrics: Metrics = Metrics()
    websocket: WebSocket = WebSocket()

    @field_validator("trusted_proxies", "allow_cidrs", "deny_cidrs", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        return _parse_networks(v)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class Problem:
    """One error or warning, with the field path it is about."""

    path: str
    message: str
    risky: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The config is invalid; ``problems`` lists every error with its field path."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """The field names allowed at ``loc`` (for 'did you mean' hints)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            # dict-of-models (upstreams.NAME, policies.NAME): step into the value model
            if model is Upstream or model is Policy:
                continue
            return []
        ann = fields[part].annotation
        model = _model_in(ann)
        if model is None:
            return []
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _model_in(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = format_loc(loc)
        if err["type"] == "extra_forbidden":
            hint = ""
            if loc and isinstance(loc[-1], str):
                close = difflib.get_close_matches(loc[-1], _known_fields(loc), n=1)
                if close:
                    hint = f" (did you mean '{close[0]}'?)"
            problems.append(Problem(path, f"unknown key{hint}"))
            continue
        msg = err["msg"]
        msg = msg.removeprefix("Value error, ")
        if (
            err["type"] != "missing"
            and "got " not in msg
            and "input" in err
            and not isinstance(err["input"], dict | list)
        ):
            msg = f"{msg} (got {err['input']!r})"
        problems.append(Problem(path, msg))
    return problems


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
    """References and guard settings of each route (plain data, as in :func:`_cross_check`)."""
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


def _cross_check(data: Mapping[str, Any]) -> list[Problem]:
    """Rules across fields (references between sections, orders between values).

    They run on plain data, the raw YAML or a validated config's dump: when type
    validation fails the operator still sees these errors in the same run.  A part with
    the wrong shape is skipped here (validation reports it).
    """
    problems: list[Problem] = []
    upstreams_raw = data.get("upstreams")
    upstreams = _names(upstreams_raw, _default_upstreams())
    policies = _names(_section(data.get("rate_limit"), "policies"), _default_policies())
    routes = data.get("routes")
    if routes is None:  # absent: the default route (whose upstream is 'api')
        routes = [r.model_dump() for r in _default_routes()]
    if isinstance(routes, list | tuple):
        underscores = _section(data.get("request"), "headers_with_underscores")
        problems.extend(_route_problems(routes, upstreams, policies, underscores))
    problems.extend(_underscore_key_problems(data))
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


# --------------------------------------------------------------------------- secrets


@dataclass(frozen=True, slots=True)
class Secrets:
    """Values of the ``*_env`` fields, read from the environment at load time."""

    admin_token: str | None = None
    redis_url: str | None = None
    database_dsn: str | None = None
    route_secrets: Mapping[str, bytes] = field(default_factory=dict)


def _env(environ: Mapping[str, str], name: str | None) -> str | None:
    if not name:
        return None
    value = environ.get(name, "")
    return value or None


def resolve_secrets(cfg: Config, environ: Mapping[str, str]) -> tuple[Secrets, list[Problem]]:
    warnings: list[Problem] = []
    admin_token = _env(environ, cfg.admin.token_env)
    if admin_token is None:
        where = (
            f"environment variable {cfg.admin.token_env} is not set"
            if cfg.admin.token_env
            else "no token_env"
        )
        warnings.append(
            Problem(
                "admin.token_env",
                f"{where}: /admin/* endpoints refuse every call (403)",
                risky=True,
            )
        )
    redis_url = _env(environ, cfg.rate_limit.redis_url_env)
    if cfg.rate_limit.backend == "redis" and redis_url is None:
        warnings.append(
            Problem(
                "rate_limit.redis_url_env",
                f"environment variable {cfg.rate_limit.redis_url_env} is not set:"
                f" the redis backend is unavailable (on_backend_error:"
                f" {cfg.rate_limit.on_backend_error} applies)",
            )
        )
    dsn = None
    if cfg.database is not None:
        dsn = _env(environ, cfg.database.dsn_env)
        if dsn is None:
            warnings.append(
                Problem(
                    "database.dsn_env",
                    f"environment variable {cfg.database.dsn_env} is not set:"
                    " the database component reports unhealthy",
                )
            )
    route_secrets: dict[str, bytes] = {}
    for i, route in enumerate(cfg.routes):
        if route.shared_secret is None:
            continue
        value = _env(environ, route.shared_secret.value_env)
        if value is None:
            warnings.append(
                Problem(
                    f"routes[{i}].shared_secret.value_env",
                    f"environment variable {route.shared_secret.value_env} is not set:"
                    " every request to this route is refused (403)",
                )
            )
        else:
            route_secrets[route.name] = value.encode()
    return Secrets(admin_token, redis_url, dsn, route_secrets), warnings


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


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML keeps the last value silently: a second ``routes:`` would drop the first
    block's routes (and their guards) without a word.  Keys merged in with ``<<`` may
    still be overridden, as YAML means them to be.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (the first one would be silently ignored)",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass(frozen=True, slots=True)
class Settings:
    """A loaded config: the validated object, its secrets, its warnings and its origin."""

    config: Config
    secrets: Secrets
    warnings: tuple[Problem, ...]
    source: str | None
    digest: str

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "source": self.source or "built-in defaults",
            "listeners": {
                "proxy": f"{cfg.listen.host}:{cfg.listen.port}",
                "admin": f"{cfg.admin.host}:{cfg.admin.port}",
            },
            "upstreams": {n: u.url for n, u in cfg.upstreams.items()},
            "routes": [f"{r.name} {r.path_prefix} -> {r.upstream}" for r in cfg.routes],
            "policies": {
                n: f"{p.requests}/{p.period_s}s burst {p.effective_burst} key {p.key} {p.mode}"
                for n, p in cfg.rate_limit.policies.items()
            },
            "backend": cfg.rate_limit.backend,
            "warnings": [str(w) for w in self.warnings],
        }

    def summary_line(self) -> str:
        cfg = self.config
        n_warn = len(self.warnings)
        return (
            f"ok: {len(cfg.upstreams)} upstream(s), {len(cfg.routes)} route(s), "
            f"{len(cfg.rate_limit.policies)} policy(ies), backend {cfg.rate_limit.backend}, "
            f"listen :{cfg.listen.port}, admin :{cfg.admin.port}, {n_warn} warning(s)"
        )


def parse_config(data: Any) -> Config:
    """Validate already-parsed YAML data; raise :class:`ConfigError` with every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("", "the top level must be a mapping of keys")])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        # the cross-reference errors too, read from the raw data: all errors in one run
        raise ConfigError(_pydantic_problems(exc) + _cross_check(data)) from None
    problems = _cross_check(cfg.model_dump())
    if problems:
        raise ConfigError(problems)
    return cfg


def load_text(
    text: str,
    *,
    source: str | None = None,
    environ: Mapping[str, str] | None = None,
    digest: str | None = None,
) -> Settings:
    try:
        data = yaml.load(text, Loader=_Loader) if text.strip() else None  # noqa: S506 - a SafeLoader
        cfg = parse_config(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("", f"invalid YAML: {where}{problem}")]) from None
    except RecursionError:
        # PyYAML's parser recurses once a nesting level: a few KB of "[[[[" exceed
        # Python's limit; no real config comes near it
        raise ConfigError([Problem("", "invalid YAML: nested too deeply")]) from None
    secrets, warnings = resolve_secrets(cfg, os.environ if environ is None else environ)
    warnings.extend(risky_settings(cfg))
    digest = digest or hashlib.sha256(text.encode()).hexdigest()
    return Settings(cfg, secrets, tuple(warnings), source, digest)


MAX_CONFIG_BYTES = 1 << 20  # far above any real config; bounds what a read may take

_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISSOCK, "a socket"),
)


def read_config_bytes(path: Path) -> bytes:
    """The bytes of the config file at ``path``: a regular file of at most 1 MiB.

    Anything else is a :class:`ConfigError` at once, never a read that blocks or never
    ends (a path swapped for a symlink to a FIFO wedged the reload thread for good, and
    kept the process alive after SIGTERM; ``/dev/zero`` would fill memory).  The file is
    opened without blocking (a FIFO opens at once) and the opened descriptor is checked,
    not the path: a swap between a check and the open cannot slip a FIFO through.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _NOT_REGULAR if test(mode)), "special")
            msg = f"{path} is not a regular file ({kind}): refused"
            raise ConfigError([Problem("", msg)])
        chunks: list[bytes] = []
        left = MAX_CONFIG_BYTES + 1  # one byte more tells a file that is too large
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:  # EAGAIN of a file that would block, EIO...
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror}")]) from None
    finally:
        os.close(fd)
    if left <= 0:
        msg = f"{path} is larger than 1 MiB ({MAX_CONFIG_BYTES} bytes): refused"
        raise ConfigError([Problem("", msg)])
    return b"".join(chunks)


def load_file(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Settings:
    p = Path(path)
    raw = read_config_bytes(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"{p} is not UTF-8 text (byte {exc.start}): refused"
        raise ConfigError([Problem("", msg)]) from None
    digest = hashlib.sha256(raw).hexdigest()
    return load_text(text, source=str(p), environ=environ, digest=digest)


def load_default(environ: Mapping[str, str] | None = None) -> Settings:
    return load_text("", source=None, environ=environ)


def json_schema() -> dict[str, Any]:
    return Config.model_json_schema(mode="validation")
