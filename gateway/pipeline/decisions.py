"""The pipeline's decisions about a request, in one place: its client key, the address
lists, the head's limits, its target, its route and the route's guards, the rate-limit
keys and outcome, the body's size.

Pure functions of the snapshot and what the request says, each either passing (with its
result) or raising :class:`~gateway.pipeline.reject.Reject`. The handler calls them on
every request and ``/admin/explain`` on a hypothetical one, so explain cannot drift from
what requests get.
"""

from __future__ import annotations

import hmac
import math
import time
from ipaddress import IPv6Address
from typing import TYPE_CHECKING, Any, Final

import orjson

from gateway import problem
from gateway.core.keys import policy_key, value_key, wire_form
from gateway.core.paths import PathError, canonical_path, reads_as_authority
from gateway.identity.body import NO_BODY
from gateway.identity.resolver import NO_IDENTITY
from gateway.pipeline.reject import Reject, quota_reject
from gateway.pipeline.snapshot import ALLOW_ANY
from gateway.stores.limiter import Check

_tuple_new: Final = tuple.__new__  # a Check without its keyword-argument __new__ (per request)
# the class, held as a constant: a Final name is read directly in the compiled build, an
# imported one through the module's namespace on every use
_IPV6: Final = IPv6Address

RouteChecks = dict[str, "tuple[str | None, Sequence[CompiledPolicy], list[Check]]"]
"""A verified identity's rate-limit checks by route (``RequestIdentity.route_checks``),
with the client key they were made for (None: made from the identity alone)."""

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    from gateway.core.client_ip import IPAddress
    from gateway.core.failure_budget import FailureBudget
    from gateway.core.gcra import Decision
    from gateway.identity.resolver import RequestIdentity
    from gateway.pipeline.snapshot import CompiledInflight, CompiledPolicy, CompiledRoute, Snapshot
    from gateway.stores.allow import AllowList

    Fields = CIMultiDict[str] | CIMultiDictProxy[str]


def client_key(snap: Snapshot, client: IPAddress | None, client_ip: str) -> str:
    """The client's key for scores, bans and limits: its address, an IPv6 one by its
    prefix (``rate_limit.ipv6_prefix``): rotating the rest of its address must not give
    it a clean score, a lifted ban or a fresh budget."""
    # isinstance, not the ``version`` property: a call in Python on every request
    if isinstance(client, _IPV6):
        return snap.ip_key(client, client_ip)
    return client_ip


def check_lists(
    snap: Snapshot, client: IPAddress, allow: AllowList | None = None, *, count: bool = True
) -> bool:
    """403 for a denied address; True when the address is allow-listed (exempt from bans
    and limits): in ``allow_cidrs``, or, asked last, by an entry of the break-glass
    ``allow`` list (``deny_cidrs`` wins over it; ``count``: a request let through by it
    is counted, not so for ``/admin/explain``). An empty list costs one attribute read."""
    if snap.has_deny and client in snap.deny:
        raise Reject(403, "the client address is denied", type_=problem.problem_type("denied"))
    if snap.has_allow and client in snap.allow:
        return True
    if allow is None or not allow.active:
        return False
    return allow.exempts(client) if count else allow.covers(client) is not None


def check_head(
    snap: Snapshot, header_bytes: int, host: str | None, fields: Iterable[tuple[str, str]]
) -> str | None:
    """The head's limits: its size (431), its host (``allowed_hosts``, 400) and field
    names holding "_"; returns how such fields go upstream (None: there are none).

    ``host`` is read only when ``allowed_hosts`` is set (the caller may pass None else);
    ``fields``: the (name, value) pairs of the head.
    """
    if header_bytes > snap.max_header_bytes:
        raise Reject(431, "request header fields too large", event="bad_request")
    if snap.allowed_hosts and host not in snap.allowed_hosts:
        raise Reject(400, "the Host header is not one this gateway serves", event="bad_request")
    for name, _ in fields:
        if "_" in name:
            # CGI and WSGI servers read X_Forwarded_For as X-Forwarded-For (SPEC 9)
            if snap.underscores == "reject":
                raise Reject(400, "a header field name holds an underscore", event="bad_request")
            return snap.underscores
    return None


def check_method(method: str) -> None:
    """CONNECT is not proxied (405)."""
    if method == "CONNECT":
        raise Reject(405, "CONNECT is not supported", headers={"Allow": ALLOW_ANY})


def origin_form(url: URL) -> str:
    """An absolute-form target's path and query (the upstream is fixed by config); 400
    when it holds no path."""
    if not url.raw_path.startswith("/"):
        raise Reject(400, "the request target is not a path", event="bad_request")
    return url.raw_path_qs


def canonical_target(raw_path_qs: str) -> str:
    """The one reading of the path every later decision uses (SPEC 9); 400 if it has none.
    Matching ignores letter case: callers lower it once."""
    try:
        return canonical_path(raw_path_qs)
    except PathError as exc:
        raise Reject(400, str(exc), event="bad_request") from None


def route_for(snap: Snapshot, key: str, raw_path_qs: str) -> CompiledRoute:
    """The route of a lower-cased canonical path (404 when none matches). A target that
    starts with ``//`` or ``/\\`` is 400 first: URL parsers read ``//h/admin/x`` as host
    ``h`` and path ``/admin/x``, where the canonical path is ``/h/admin/x``. (Suspicious
    path scoring runs before this, so ``//.env`` still counts.)"""
    if reads_as_authority(raw_path_qs):
        raise Reject(400, "the request target starts with //", event="bad_request")
    route = snap.match(key)
    if route is None:
        raise Reject(404, "no route matches this path", event="not_found")
    return route


def secret_state(route: CompiledRoute, headers: Fields) -> str | None:
    """ "valid", "missing" or "wrong" for a route with a shared secret, else None."""
    if route.secret_header is None:
        return None
    given = headers.get(route.secret_header)
    if given is None:
        return "missing"
    if route.secret is None or not hmac.compare_digest(given.encode(), route.secret):
        return "wrong"
    return "valid"


def guard_route(
    route: CompiledRoute, method: str, client: IPAddress | None, headers: Fields
) -> None:
    """The route's guards: its methods (405), its source addresses and its shared
    secret (403)."""
    methods = route.methods
    if (method not in methods) if methods is not None else (method == "TRACE"):
        # TRACE echoes the request, credentials included: only where a route lists it
        raise Reject(405, f"{method} is not allowed on this route", headers={"Allow": route.allow})
    if route.sources is not None and (client is None or client not in route.sources):
        raise Reject(
            403,
            "the client address may not use this route",
            type_=problem.problem_type("forbidden-source"),
        )
    if route.secret_header is not None and secret_state(route, headers) != "valid":
        raise Reject(
            403,
            "missing or wrong shared secret",
            type_=problem.problem_type("forbidden"),
            event="auth_failure",
        )


def identify(
    snap: Snapshot,
    route: CompiledRoute,
    headers: Fields,
    *,
    client: str | None = None,
    failures: FailureBudget | None = None,
    spend: bool = True,
    record: Callable[[str, str], None] | None = None,
) -> RequestIdentity:
    """Who the request is, read only when its route needs it (``auth``, or a policy keyed
    by identity): a config without identity keys costs nothing here. The proxy port
    passes the client's key, its budget of failed token checks and the metric to count
    outcomes in; ``/admin/explain`` passes the key and the budget with ``spend=False``
    (a client whose budget is spent is refused there too, and nothing is counted)."""
    if not route.needs_identity or snap.identity is None:
        return NO_IDENTITY
    return snap.identity.identify(
        headers, client=client, failures=failures, spend=spend, record=record
    )


def check_auth(route: CompiledRoute, ident: RequestIdentity) -> None:
    """401 for a request without a valid credential of the route's ``auth`` kind."""
    auth = route.auth
    if auth == "none":
        return
    if auth == "jwt":
        ok = ident.claims is not None
    elif auth == "api_key":
        ok = ident.api_key is not None
    else:
        # the upstream learns that a credential was verified, not which: one sent beside
        # it that did not verify (a forged token beside one's own key) must not pass
        ok = (ident.claims is not None or ident.api_key is not None) and not ident.refused
    if not ok:
        raise Reject(
            401,
            "a valid credential is required",
            type_=problem.problem_type("unauthorized"),
            headers=None if auth == "api_key" else {"WWW-Authenticate": "Bearer"},
            event="auth_failure",
        )


def identity_value(pol: CompiledPolicy, ident: RequestIdentity) -> str | None:
    """The key of an identity policy: a claim of the verified token (a string as it is,
    any other value as its JSON text) or the API key's id; None when it has none."""
    if pol.claim is not None:
        claims = ident.claims
        if claims is None or pol.claim not in claims:
            return None
        value = claims[pol.claim]
        if isinstance(value, str):
            return value or None
        if value is None:
            return None
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return ident.api_key


def policy_key_of(
    pol: CompiledPolicy | CompiledInflight,
    route: CompiledRoute,
    ip: str,
    headers: Fields,
    *,
    decoded: bool,
) -> str:
    """The budget key of one policy; ``ip`` is the client's key, ``decoded``: the field
    values were decoded as UTF-8 (they are keyed in their wire form)."""
    header = pol.header
    value = None
    if header:
        values = headers.getall(header, ())
        if len(values) > 1:
            # whose budget? the upstream may read another one than the key would
            raise Reject(400, f"more than one {header} field", event="bad_request")
        if values:
            value = wire_form(values[0]) if decoded else values[0]
    return policy_key(pol.key, ip, route.name, header, value)


def policy_checks(
    route: CompiledRoute,
    ip: str,
    headers: Fields,
    *,
    decoded: bool,
    ident: RequestIdentity = NO_IDENTITY,
    body: Any = NO_BODY,
) -> tuple[Sequence[CompiledPolicy], list[Check]]:
    """The policies that apply (an identity or body policy without its value gives way to
    its fallback, or is keyed by the client address) and one check for each. ``body`` is
    the request's parsed JSON body (:func:`gateway.identity.body.parse_body`)."""
    cost = route.cost
    if not (route.needs_identity or route.needs_body):
        return route.policies, [
            _tuple_new(
                Check,
                (p.store, p.rate, policy_key_of(p, route, ip, headers, decoded=decoded), cost),
            )
            for p in route.policies
        ]
    memo: RouteChecks | None = ident.route_checks
    if memo is not None:
        kept = memo.get(route.name)
        # made from the identity alone, or from it and this client key (the same
        # client sending its token again: the common case)
        if kept is not None and (kept[0] is None or kept[0] == ip):
            return kept[1], kept[2]
    applied: list[CompiledPolicy] = []
    checks: list[Check] = []
    by_ip = False  # a key is the client key (or made from it and the route alone)
    by_request = False  # a key is made from the request's fields or body
    plan = ident.plan
    for p in route.policies:
        if p.plans is not None and plan is not None:
            p = p.plans.get(plan, p)  # noqa: PLW2901 - the policy as in force for the plan
        if p.key == "ip":  # the common case, as policy_key_of keys it
            by_ip = True
            key = ip
        elif p.pointer is None and not p.identity:
            if p.header is None:
                by_ip = True
            else:
                by_request = True
            key = policy_key_of(p, route, ip, headers, decoded=decoded)
        else:
            if p.pointer is not None:
                by_request = True  # the body's value: each request its own
                value = p.pointer.value_text(body)
                tag = "b"
            else:
                value = identity_value(p, ident)
                tag = "j:" + p.claim if p.claim is not None else "k"
            if value is not None:
                key = value_key(tag, value)
            elif p.fallback is not None:
                fb = p.fallback
                if fb in route.policies or fb in applied:
                    continue  # spent once, as the route's own or another's fallback
                p = fb  # noqa: PLW2901 - the fallback stands in for the policy
                if p.header is None:
                    by_ip = True
                else:
                    by_request = True
                key = policy_key_of(p, route, ip, headers, decoded=decoded)
            else:
                # rotating garbage credentials must not dodge the limit: the address's
                by_ip = True
                key = ip
        applied.append(p)
        checks.append(_tuple_new(Check, (p.store, p.rate, key, cost)))
    if memo is not None and not by_request:
        # kept with the verified token (bounded as its cache is: one entry a route)
        memo[route.name] = (ip if by_ip else None, applied, checks)
    return applied, checks


def limit_outcome(
    policies: Sequence[CompiledPolicy],
    decisions: Sequence[Decision],
    wall_clock: Callable[[], float] = time.time,
) -> tuple[Reject | None, list[tuple[str, str]] | None]:
    """The 429 when an enforced policy has no budget left, else the RateLimit fields of
    the tightest enforced policy (None: no enforced policy). ``wall_clock``: the
    limiter's, for the month of a monthly quota's ``w=``."""
    violated: list[tuple[CompiledPolicy, Decision]] | None = None
    tightest: CompiledPolicy | None = None
    least = 0
    reset = 0.0
    if len(policies) != len(decisions):  # (zip's strict=True costs a keyword parse a call)
        msg = "one decision for each policy"
        raise ValueError(msg)
    for pol, dec in zip(policies, decisions):  # noqa: B905 - lengths checked above
        if pol.shadow:
            continue
        if dec.allowed:
            if tightest is None or dec.remaining < least:
                tightest, least, reset = pol, dec.remaining, dec.reset_s
        else:
            if violated is None:
                violated = []
            violated.append((pol, dec))
    if violated:
        retry = max(d.retry_after_s for _, d in violated)
        return quota_reject(violated, retry, wall_clock()), None
    if tightest is None:
        return None, None
    return None, [
        (
            "RateLimit-Policy",
            tightest.policy_header if not tightest.month else tightest.header_item(wall_clock()),
        ),
        ("RateLimit", f'"{tightest.name}";r={least};t={math.ceil(reset)}'),
    ]


def check_size(snap: Snapshot, content_length: int | None) -> None:
    """413 for a declared body over ``max_body_bytes``."""
    if content_length is not None and content_length > snap.max_body_bytes:
        raise Reject(
            413,
            f"the request body is larger than {snap.max_body_bytes} bytes",
            event="bad_request",
        )
