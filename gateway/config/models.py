"""The configuration's models: one typed, frozen, validated object (SPEC section 3).

Every field has a default and unknown keys are errors.  Secrets never live in the file:
fields ending in ``_env`` name an environment variable, resolved at load time
(:mod:`gateway.config.loading`).  Rules across fields are :mod:`gateway.config.checks`.

Most settings apply on reload; those marked *restart-only* below keep their old values
until the gateway restarts (a reload logs ``config_change_needs_restart``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.core.framing import parse_host_entry
from gateway.core.paths import PathError, canonical_path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD_RE = re.compile(r"^[A-Z]+$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CLAIM_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

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
    # restart-only
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


class Concurrency(_Model):
    # fixed: max_inflight is the limit (version 1); adaptive: learned from latency,
    # between min and max_inflight (SPEC section 10)
    mode: Literal["fixed", "adaptive"] = "fixed"
    min: PositiveInt = 4


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
    concurrency: Concurrency = Concurrency()

    @field_validator("concurrency")
    @classmethod
    def _min_under_cap(cls, v: Concurrency, info: ValidationInfo) -> Concurrency:
        cap = info.data.get("max_inflight")
        if v.mode == "adaptive" and cap is not None and v.min > cap:
            msg = f"min ({v.min}) must be at most max_inflight ({cap})"
            raise ValueError(msg)
        return v

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
    # the units a request takes from each of the route's rate policies (SPEC 11)
    cost: PositiveInt = 1
    # a request without a valid credential of this kind gets 401 (SPEC 11)
    auth: Literal["none", "jwt", "api_key", "any"] = "none"
    # at the upstream's concurrency limit, bulk is refused first, critical last
    priority: Literal["critical", "normal", "bulk"] = "normal"

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
    # a rate policy has requests and period_s; a concurrency policy has max_inflight
    # instead (SPEC section 10): the key's requests in flight at once, on this replica
    requests: PositiveInt | None = None
    period_s: PositiveSeconds | None = None
    # a calendar quota (SPEC 11): requests a UTC hour, day or month, instead of period_s
    period: Literal["hour", "day", "month"] | None = None
    burst: PositiveInt | None = None
    key: str = "ip"
    mode: Literal["enforce", "shadow"] = "enforce"
    # the policy that limits a request whose key cannot be computed (SPEC 11); None: this
    # policy, keyed by the client address
    fallback: str | None = None
    max_inflight: PositiveInt | None = None
    # requests (and burst, unless given) for the requests of a plan: the plan_claim of
    # the token, or the API key's plan (SPEC 11); other plans and none use requests
    requests_by_plan: dict[Annotated[str, Field(min_length=1, max_length=64)], PositiveInt] = Field(
        default_factory=dict
    )

    @field_validator("requests_by_plan")
    @classmethod
    def _plans_of_a_rate(cls, v: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        if v and info.data.get("max_inflight") is not None:
            msg = "a concurrency policy has no requests to set per plan"
            raise ValueError(msg)
        return v

    @field_validator("period")
    @classmethod
    def _one_period(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("period_s") is not None:
            msg = "give period (a calendar quota) or period_s (a rolling rate), not both"
            raise ValueError(msg)
        return v

    @field_validator("burst")
    @classmethod
    def _no_calendar_burst(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("period") is not None:
            msg = "a calendar quota (period) has no burst: its requests are the whole window's"
            raise ValueError(msg)
        return v

    @field_validator("max_inflight")
    @classmethod
    def _one_kind(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None:
            for name in ("requests", "period_s", "period", "burst"):
                if info.data.get(name) is not None:
                    msg = f"a concurrency policy cannot also have {name}"
                    raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _rate_complete(self) -> Policy:
        if self.max_inflight is None and (
            self.requests is None or (self.period_s is None and self.period is None)
        ):
            msg = (
                "requests and period_s (or period) are required"
                " (or max_inflight, for a concurrency policy)"
            )
            raise ValueError(msg)
        return self

    @property
    def concurrency(self) -> bool:
        return self.max_inflight is not None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        if v in ("ip", "route", "ip_route", "api_key"):
            return v
        if v.startswith("header:") and _TOKEN_RE.match(v[7:]):
            return v
        if v.startswith("jwt:") and _CLAIM_RE.match(v[4:]):
            return v
        if v.startswith("json:"):
            from gateway.identity.body import JsonPointer  # noqa: PLC0415 - config loads first

            try:
                JsonPointer(v[5:])
            except ValueError as exc:
                raise ValueError(str(exc)) from None
            return v
        msg = (
            "must be ip, route, ip_route, header:NAME, jwt:CLAIM, api_key or json:/POINTER,"
            f" got {v!r}"
        )
        raise ValueError(msg)

    @property
    def identity_key(self) -> bool:
        """Keyed by who the request is (a verified token's claim or an API key's id)."""
        return self.key == "api_key" or self.key.startswith("jwt:")

    @property
    def effective_burst(self) -> int:
        return self.burst if self.burst is not None else (self.requests or 1)


def default_policies() -> dict[str, Policy]:
    return {"per-ip": Policy(requests=100, period_s=1, burst=200, key="ip")}


def default_upstreams() -> dict[str, Upstream]:
    return {"api": Upstream(url="http://127.0.0.1:8080")}


def default_routes() -> tuple[Route, ...]:
    return (Route(name="default", path_prefix="/", upstream="api", rate_limits=("per-ip",)),)


class Jwt(_Model):
    jwks_file: str | None = None  # public keys (RS256, ES256, EdDSA); re-read like the config
    hs256_secret_env: EnvName | None = None  # a shared secret (HS256)
    issuer: str | None = None  # checked when set
    audience: str | None = None  # checked when set
    leeway_s: NonNegativeSeconds = 30
    plan_claim: str | None = None
    # refusals after a signature check one client address may cause, refilled over
    # failed_window_s; then its new tokens are refused unchecked (null: no limit)
    max_failed_per_ip: Annotated[int, Field(ge=1)] | None = 100
    failed_window_s: PositiveSeconds = 10


class ApiKeysConfig(_Model):
    header: HeaderName = "X-API-Key"
    file: str | None = None  # keys: [{id, sha256: <hex of the key>, plan}]


class Identity(_Model):
    jwt: Jwt | None = None
    api_keys: ApiKeysConfig | None = None


class RateLimit(_Model):
    backend: Literal["memory", "redis"] = "memory"  # restart-only: the stores are made at start
    redis_url_env: EnvName = "GATEWAY_REDIS_URL"  # restart-only
    on_backend_error: Literal["local", "allow", "deny"] = "local"
    ipv6_prefix: Annotated[int, Field(ge=1, le=128)] = 64
    max_keys: Annotated[int, Field(ge=1000)] = 1_000_000
    policies: dict[str, Policy] = Field(default_factory=default_policies)


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


class Tracing(_Model):
    # the share of new traces (no valid traceparent) marked sampled; a caller's flag is kept
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    # OTLP/HTTP traces endpoint; needs the optional extra gateway[otel]. restart-only
    otlp_endpoint: str | None = None
    # spans exported per second at most (a client may mark every request sampled)
    max_spans_per_s: PositiveInt = 1000

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from yarl import URL  # noqa: PLC0415 - only needed while validating

        from gateway.tracing import otel_missing  # noqa: PLC0415 - the SDK's import is lazy

        try:
            url = URL(v)
        except (ValueError, TypeError) as exc:
            msg = f"invalid URL {v!r}: {exc}"
            raise ValueError(msg) from None
        if url.scheme not in ("http", "https") or not url.host:
            msg = f"must be an http:// or https:// URL with a host, got {v!r}"
            raise ValueError(msg)
        if url.query_string or url.fragment:
            msg = "must have no query or fragment"
            raise ValueError(msg)
        missing = otel_missing()
        if missing is not None:
            msg = (
                f"OTLP export needs the optional extra gateway[otel] "
                f"(pip install 'gateway[otel]'): {missing}"
            )
            raise ValueError(msg)
        if url.path in ("", "/"):  # a collector's base URL: its OTLP/HTTP traces path
            url = url.with_path("/v1/traces")
        return str(url)


class Config(_Model):
    """The whole configuration (SPEC section 3)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        title="Gateway configuration",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    listen: Listen = Listen()  # restart-only: the sockets are bound at start
    admin: Admin = Admin()  # restart-only
    trusted_proxies: tuple[IPNetwork, ...] = ()
    allowed_hosts: tuple[HostName, ...] = ()
    allow_cidrs: tuple[IPNetwork, ...] = ()
    deny_cidrs: tuple[IPNetwork, ...] = ()
    request: RequestLimits = RequestLimits()
    upstreams: dict[Annotated[str, Field(pattern=_NAME_RE.pattern)], Upstream] = Field(
        default_factory=default_upstreams
    )
    routes: tuple[Route, ...] = Field(default_factory=default_routes)
    identity: Identity = Identity()
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
    tracing: Tracing = Tracing()

    @field_validator("trusted_proxies", "allow_cidrs", "deny_cidrs", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        return _parse_networks(v)
