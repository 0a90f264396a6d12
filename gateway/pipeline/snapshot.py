"""A config compiled for the request path: everything a request reads, in one object.

A request reads one snapshot from start to end, the map of upstreams included; a reload
builds a new one and swaps the reference, so no request ever sees half of two configs.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

from multidict import istr

from gateway.core.abuse import PathMatcher
from gateway.core.calendar import month_length_s
from gateway.core.client_ip import IPAddress, Networks
from gateway.core.concurrency import Priority
from gateway.core.gcra import Rate
from gateway.identity.body import JsonPointer
from gateway.pipeline.headers import ResponseHeaders
from gateway.stores.limiter import plan_store, policy_rate
from gateway.upstream.hop_by_hop import DROP_UPSTREAM, HOP_BY_HOP

# W3C Trace Context's request fields: the gateway sends its own
TRACE_FIELDS = frozenset(("traceparent", "tracestate"))

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.config import Policy, Route, Settings
    from gateway.upstream.state import UpstreamState

REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
NO_ROUTE: Final = "none"  # the route label of a request that matched no route
KNOWN_METHODS: Final = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
)
# the Allow field of a 405 for a route that lists no methods (TRACE and CONNECT are refused)
ALLOW_ANY = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
# w= of a calendar quota: its window in seconds (a month's is that of the current month,
# added when a header is written)
_CALENDAR_W = {"hour": "3600", "day": "86400"}
_PRIORITIES = {
    "critical": Priority.CRITICAL,
    "normal": Priority.NORMAL,
    "bulk": Priority.BULK,
}


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    name: str
    rate: Rate
    key: str  # ip | route | ip_route | header | jwt | api_key | json
    header: str | None
    shadow: bool
    policy_header: str  # RateLimit-Policy item, e.g. "per-ip";q=100;w=1
    claim: str | None = None  # the claim of a jwt:CLAIM key
    pointer: JsonPointer | None = None  # the pointer of a json:POINTER key
    month: bool = False  # a monthly quota: w= is the length of the current month
    # the policy that limits a request without an identity (None: this one, by address)
    fallback: CompiledPolicy | None = None
    # where the limiter keeps its budgets: the name, or the name and a plan's
    store: str = ""
    # requests_by_plan: the policy as in force for each plan (None: no plans)
    plans: Mapping[str, CompiledPolicy] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.store:
            object.__setattr__(self, "store", self.name)

    @property
    def identity(self) -> bool:
        """Keyed by a verified token's claim or an API key's id."""
        return self.claim is not None or self.key == "api_key"

    @classmethod
    def of(cls, name: str, p: Policy, plan: str | None = None) -> CompiledPolicy:
        """The policy, or (``plan``) the policy as in force for that plan."""
        requests = p.requests if plan is None else p.requests_by_plan[plan]
        header = p.key[7:] if p.key.startswith("header:") else None
        claim = p.key[4:] if p.key.startswith("jwt:") else None
        pointer = JsonPointer(p.key[5:]) if p.key.startswith("json:") else None
        kind = "header" if header else "jwt" if claim else "json" if pointer else p.key
        period = p.period_s or 1
        w = math.ceil(period) if period != int(period) else int(period)
        w_text = str(w) if p.period is None else _CALENDAR_W.get(p.period, "")
        return cls(
            name=name,
            rate=policy_rate(p, requests),
            key=kind,
            header=header,
            shadow=p.mode == "shadow",
            policy_header=f'"{name}";q={requests};w={w_text}',
            claim=claim,
            pointer=pointer,
            month=p.period == "month",
            store=name if plan is None else plan_store(name, plan),
        )

    def header_item(self, now: float) -> str:
        """The policy's RateLimit-Policy item at ``now`` (UTC epoch seconds)."""
        if not self.month:
            return self.policy_header
        return self.policy_header + str(month_length_s(now))


@dataclass(frozen=True, slots=True)
class CompiledInflight:
    """A concurrency policy (SPEC section 10): ``limit`` requests in flight per key."""

    name: str
    limit: int
    key: str  # ip | route | ip_route | header
    header: str | None
    shadow: bool

    @classmethod
    def of(cls, name: str, p: Policy) -> CompiledInflight:
        header = p.key[7:] if p.key.startswith("header:") else None
        return cls(
            name=name,
            limit=p.max_inflight or 1,
            key="header" if header else p.key,
            header=header,
            shadow=p.mode == "shadow",
        )


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    prefix: str
    key: str  # the prefix in lower case: paths match it in any letter case
    bare: str | None  # a prefix ending in "/" also matches the path without it
    upstream: str
    methods: frozenset[str] | None
    allow: str  # the Allow header for a 405
    sources: Networks | None
    secret_header: str | None
    secret: bytes | None  # None with a secret_header: the env var is unset -> refuse all
    policies: tuple[CompiledPolicy, ...]
    ip_keyed: bool  # every policy is keyed by the client address alone
    rates: tuple[tuple[str, Rate], ...]  # (name, rate) of each policy
    cost: int  # units each request takes from each of its rate policies
    auth: str  # none | jwt | api_key | any
    needs_identity: bool  # auth, or a policy keyed by identity: credentials are read
    needs_body: bool  # a policy keyed by a JSON body's value: a small JSON body is read first
    priority: Priority
    priority_name: str
    inflight: tuple[CompiledInflight, ...]  # the route's concurrency policies
    reserved: bool  # a critical route uses this upstream: normal leaves critical a reserve

    @classmethod
    def of(
        cls,
        r: Route,
        settings: Settings,
        policies: dict[str, CompiledPolicy],
        critical_upstreams: frozenset[str] = frozenset(),
        inflight: Mapping[str, CompiledInflight] | None = None,
    ) -> CompiledRoute:
        inflight = inflight or {}
        names = [p for p in r.rate_limits if p not in inflight]
        return cls(
            name=r.name,
            prefix=r.path_prefix,
            key=r.path_prefix.lower(),
            bare=r.path_prefix[:-1].lower()
            if len(r.path_prefix) > 1 and r.path_prefix[-1] == "/"
            else None,
            upstream=r.upstream,
            methods=frozenset(r.methods) if r.methods is not None else None,
            allow=", ".join(r.methods) if r.methods is not None else ALLOW_ANY,
            sources=Networks(r.source_cidrs) if r.source_cidrs is not None else None,
            secret_header=r.shared_secret.header if r.shared_secret else None,
            secret=settings.secrets.route_secrets.get(r.name),
            policies=tuple(policies[p] for p in names),
            ip_keyed=all(policies[p].key == "ip" and policies[p].plans is None for p in names),
            rates=tuple((p, policies[p].rate) for p in names),
            cost=r.cost,
            auth=r.auth,
            needs_identity=r.auth != "none"
            or any(policies[p].identity or policies[p].plans is not None for p in names),
            needs_body=any(policies[p].pointer is not None for p in names),
            inflight=tuple(inflight[p] for p in r.rate_limits if p in inflight),
            priority=_PRIORITIES[r.priority],
            priority_name=r.priority,
            reserved=r.upstream in critical_upstreams,
        )


class Snapshot:
    """Everything the request path reads, compiled from one :class:`Settings`."""

    __slots__ = (
        "abuse_enabled",
        "allow",
        "allowed_hosts",
        "ban_status",
        "body_idle_s",
        "buffer_body_bytes",
        "client_timeout_s",
        "config",
        "deny",
        "drop_upstream",
        "has_allow",
        "has_deny",
        "identity",
        "ipv6_prefix",
        "max_body_bytes",
        "max_buffered_bytes",
        "max_header_bytes",
        "metrics_on_proxy",
        "policies",
        "response_headers",
        "rid_field",
        "rid_header",
        "routes",
        "sample_ratio",
        "settings",
        "suspicious",
        "trace_ratio",
        "trusted",
        "underscores",
        "upstreams",
    )

    def __init__(
        self, settings: Settings, upstreams: Mapping[str, UpstreamState] | None = None
    ) -> None:
        cfg = settings.config
        self.settings = settings
        # the upstreams' live state (breakers, pools, counts) outlives reloads; the map of
        # names to it is this config's, read with the rest of it
        self.upstreams: Mapping[str, UpstreamState] = upstreams if upstreams is not None else {}
        self.config = cfg
        self.trusted = Networks(cfg.trusted_proxies)
        self.allow = Networks(cfg.allow_cidrs)
        self.deny = Networks(cfg.deny_cidrs)
        self.has_allow = bool(self.allow)
        self.has_deny = bool(self.deny)
        self.allowed_hosts = frozenset(cfg.allowed_hosts)
        pols = cfg.rate_limit.policies
        # the rate policies (the limiter's) and the concurrency policies apart
        plain = {n: CompiledPolicy.of(n, p) for n, p in pols.items() if not p.concurrency}
        self.policies = {}
        for n, p in pols.items():
            if p.concurrency:
                continue
            fallback = plain[p.fallback] if p.fallback is not None else None
            plans = (
                {
                    plan: replace(CompiledPolicy.of(n, p, plan), fallback=fallback)
                    for plan in p.requests_by_plan
                }
                if p.requests_by_plan
                else None
            )
            self.policies[n] = replace(plain[n], fallback=fallback, plans=plans)
        inflight = {n: CompiledInflight.of(n, p) for n, p in pols.items() if p.concurrency}
        critical = frozenset(r.upstream for r in cfg.routes if r.priority == "critical")
        self.identity = settings.identity
        self.routes = tuple(
            CompiledRoute.of(r, settings, self.policies, critical, inflight) for r in cfg.routes
        )
        self.response_headers = ResponseHeaders(cfg)
        self.rid_header = cfg.request.request_id_header
        self.rid_field = istr(self.rid_header)  # looked up as istr: not case-folded each time
        # the request fields not passed upstream as they are, hop-by-hop ones included (the
        # request id and the trace context are set anew)
        self.drop_upstream = DROP_UPSTREAM | HOP_BY_HOP | TRACE_FIELDS | {self.rid_header.lower()}
        self.underscores = cfg.request.headers_with_underscores
        self.max_body_bytes = cfg.request.max_body_bytes
        self.max_header_bytes = cfg.request.max_header_bytes
        self.client_timeout_s = cfg.request.client_timeout_s
        self.buffer_body_bytes = cfg.request.buffer_body_bytes
        self.max_buffered_bytes = cfg.request.max_buffered_bytes
        self.body_idle_s = cfg.request.body_idle_s
        self.ipv6_prefix = cfg.rate_limit.ipv6_prefix
        self.suspicious = PathMatcher(cfg.abuse.suspicious_paths)
        self.abuse_enabled = cfg.abuse.enabled
        self.ban_status = cfg.abuse.ban_status
        self.sample_ratio = cfg.access_log.sample_ratio if cfg.access_log.enabled else 0.0
        self.metrics_on_proxy = cfg.metrics.on_proxy_port
        self.trace_ratio = cfg.tracing.sample_ratio

    def match(self, key: str) -> CompiledRoute | None:
        """The first route whose prefix ``key`` has: ``key`` is the request's canonical path
        in lower case (:func:`gateway.core.paths.canonical_path`); the target itself goes
        upstream as sent.  Letter case never picks another route: an upstream that serves
        ``/Admin`` as ``/admin`` must not be reached around ``/admin/``'s guards."""
        for route in self.routes:
            if key.startswith(route.key) or key == route.bare:
                return route
        return None

    def ip_key(self, ip: IPAddress, text: str | None = None) -> str:
        """The rate-limit key of an address (IPv6 by its prefix); ``text`` is str(ip)."""
        if ip.version == 6 and self.ipv6_prefix < 128:
            net = ipaddress.IPv6Network((int(ip), self.ipv6_prefix), strict=False)
            return str(net)
        return text if text is not None else str(ip)
