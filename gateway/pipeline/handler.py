"""The request pipeline of the proxy port, as plain calls in SPEC order.

    client IP -> request id -> probes -> trace context -> deny/allow lists and bans
      -> head limits
      -> route match -> route guards -> rate limits -> body size
      -> upstream leg (breaker / bulkhead, send, answer) or WebSocket leg
      -> (headers in the prepare hook) -> metrics + access log

Each step either passes or raises :class:`~gateway.pipeline.reject.Reject`, which becomes
one problem+json response; what was decided is recorded once at the end. The decisions
themselves are :mod:`gateway.pipeline.decisions` (``/admin/explain`` calls them too), the
upstream leg is :mod:`gateway.pipeline.upstream_leg`, the WebSocket leg
:mod:`gateway.pipeline.websocket`.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from typing import TYPE_CHECKING, Final

from aiohttp import hdrs
from multidict import istr

from gateway import problem
from gateway.core.client_ip import forwarded_proto, forwarded_values, resolve_client
from gateway.core.evidence import Seen
from gateway.core.tracecontext import start_or_continue
from gateway.health.probes import PROBE_PATHS, probe_answer
from gateway.identity.body import NO_BODY
from gateway.identity.resolver import NO_IDENTITY
from gateway.logs import milliseconds
from gateway.pipeline import decisions
from gateway.pipeline.context import Ctx
from gateway.pipeline.reject import Reject, banned, problem_answer, too_many_in_flight
from gateway.pipeline.snapshot import KNOWN_METHODS, NO_ROUTE, REQUEST_ID_RE
from gateway.pipeline.upstream_leg import UpstreamLeg
from gateway.pipeline.websocket import relay_websocket, websocket_handshake
from gateway.stores.limiter import BackendUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Sequence

    from aiohttp import web

    from gateway.core.gcra import Decision
    from gateway.downstream.messages import AnyResponse, Response
    from gateway.pipeline.request import AnyRequest
    from gateway.pipeline.snapshot import CompiledPolicy, CompiledRoute, Snapshot
    from gateway.runtime import Runtime
    from gateway.upstream.state import UpstreamState

_PROBES = frozenset(PROBE_PATHS)
# the paths local_answer answers (with the probes' prefix)
_LOCAL: Final = _PROBES | {"/metrics"}
_LOCAL_PREFIX: Final = "/readyz/"
# field names looked up as istr: a plain str is case-folded anew on every lookup
_TRACEPARENT: Final = istr("traceparent")
_TRACESTATE: Final = istr("tracestate")
# what every request reads, held as constants: a Final name is read directly in the
# compiled build, an imported one (or a module's attribute) through a namespace on every use
_X_FORWARDED_FOR: Final = hdrs.X_FORWARDED_FOR
_FORWARDED: Final = hdrs.FORWARDED
_UPGRADE: Final = hdrs.UPGRADE
_NO_BODY: Final = NO_BODY
_time: Final = time.time
_random: Final = random.random
# the last two hex digits of a request id's counter: the rest is formatted once in 256
_HEX2: Final = tuple(f"{i:02x}" for i in range(256))


class ProxyHandler:
    """Callable handed to the proxy port's server; one per gateway process."""

    __slots__ = ("_loop", "_rid_head", "_rid_prefix", "_rid_seq", "leg", "rt", "tracing")

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._loop = asyncio.get_running_loop()
        # request ids: a random per-process prefix and a counter (unique, no syscall)
        self._rid_prefix = secrets.token_hex(8)
        self._rid_seq = 0
        self._rid_head = ""  # the prefix and the counter's hex but its last two digits
        self.leg = UpstreamLeg(runtime, self._loop)
        # False only in bench/inprocess.py: the cost of trace context against none
        self.tracing = True

    # ------------------------------------------------------------------ entry

    def answer_now(self, request: AnyRequest) -> AnyResponse | None:
        """Probes (and /metrics when on this port), answered as soon as the head is parsed.

        They read cached state only, so the server writes them from its parsing callback:
        a probe never queues behind the requests of a saturated proxy.
        """
        snap = self.rt.snapshot
        resp = self.local_answer(request, snap)
        if resp is not None:
            self.identify(request, snap, Ctx(self._loop.time()))
        return resp

    async def __call__(self, request: AnyRequest) -> AnyResponse | web.StreamResponse:
        snap = self.rt.snapshot
        start = self._loop.time()
        ctx = Ctx(start)
        via_proxy = self.identify(request, snap, ctx)

        local = self.local_answer(request, snap)
        if local is not None:
            return local
        if self.tracing:  # before any refusal: the access log of a refusal carries it too
            headers = request.headers
            parent = headers.getall(_TRACEPARENT, None)
            ctx.trace = start_or_continue(
                parent,
                headers.getall(_TRACESTATE, None) if parent is not None else None,
                snap.trace_ratio,
            )

        resp: AnyResponse | web.StreamResponse
        try:
            up, raw_path_qs = await self.admit(request, snap, ctx)
            route = ctx.route
            if route is not None and route.inflight and not ctx.exempt:
                # the route's concurrency policies: held until the exchange is over; a
                # WebSocket's until it closes (an open socket is a request in flight, as
                # NGINX's limit_conn and Traefik's inFlightReq count it)
                held = self.take_inflight(request, ctx, route)
                try:
                    resp = await self.leg_for(request, snap, ctx, up, raw_path_qs, via_proxy)
                finally:
                    counts = self.rt.inflight_keys
                    for name, key in held:
                        counts.release(name, key)
            else:
                resp = await self.leg_for(request, snap, ctx, up, raw_path_qs, via_proxy)
        except Reject as rej:
            if ctx.body_held is not None:
                self.leg.release_body(ctx)
            resp = self.reject(request, snap, ctx, rej)
        except BaseException as exc:
            if ctx.body_held is not None:  # the client left: the body read for a key goes
                self.leg.release_body(ctx)
            if ctx.streamed or isinstance(exc, ConnectionError):
                # an answer cut short (either side gone) is recorded all the same
                ctx.snap = snap
                request.pending_record = ctx
            raise
        # recorded once the answer is written (finished): its metrics and log line are
        # not what the client waits for, as NGINX logs after the answer is sent
        ctx.snap = snap
        request.pending_record = ctx
        return resp

    def finished(self, request: AnyRequest, resp: AnyResponse | web.StreamResponse | None) -> None:
        """The server's hook once it has written the answer of a request this handler
        answered (``resp``), or once it could not (None): the request's metrics and
        access log line."""
        ctx = request.pending_record
        if type(ctx) is not Ctx or ctx.snap is None:
            return  # not answered by __call__ (a local answer, a raised error)
        request.pending_record = None
        if resp is not None:
            status = ctx.status or resp.status
        elif ctx.streamed:  # cut short: the status the client was sent, the bytes written
            status = ctx.status
        else:  # the client left before its answer could go out (NGINX's 499)
            status = 499
            ctx.bytes_out = 0
        self.record(request, ctx.snap, ctx, status)

    def leg_for(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        up: UpstreamState,
        raw_path_qs: str,
        via_proxy: bool,
    ) -> Awaitable[AnyResponse | web.StreamResponse]:
        """The leg the request takes (a WebSocket's, or the plain exchange), to await."""
        if request.method == "GET" and request.headers.get(_UPGRADE, "").lower() == "websocket":
            if ctx.body_held is not None:  # a body read for a key: not relayed
                self.leg.release_body(ctx)
            return relay_websocket(
                self.rt,
                request,
                websocket_handshake(request),
                snap,
                ctx,
                up,
                raw_path_qs,
                via_proxy=via_proxy,
            )
        return self.leg.forward(request, snap, ctx, up, raw_path_qs, via_proxy=via_proxy)

    # ------------------------------------------------------------------ steps

    def local_answer(self, request: AnyRequest, snap: Snapshot) -> AnyResponse | None:
        """A probe's or /metrics' answer (on this port), or None for the pipeline."""
        path = request.path
        if path not in _LOCAL:
            if path.startswith(_LOCAL_PREFIX):
                return probe_answer(request, self.rt.monitor, public=True)
            return None  # the common case: one set lookup, one prefix test
        if path != "/metrics":
            return probe_answer(request, self.rt.monitor, public=True)
        return self.rt.metrics_response() if snap.metrics_on_proxy else None

    def identify(self, request: AnyRequest, snap: Snapshot, ctx: Ctx) -> bool:
        """Client address (through trusted proxies) and request id; True when via a proxy."""
        headers = request.headers
        peer, peer_text = request.peer_address()
        xff = headers.get(_X_FORWARDED_FOR)
        if xff is not None:
            fields = headers.getall(_X_FORWARDED_FOR)
            if len(fields) > 1:  # several fields are one list, in order (RFC 9110 5.3)
                xff = ", ".join(fields)
        elif _FORWARDED in headers:
            # RFC 7239: its for= list is read like X-Forwarded-For
            forwarded = ", ".join(headers.getall(_FORWARDED))
            xff = ", ".join(forwarded_values(forwarded, "for")) or None
        ctx.xff = xff
        client, via_proxy = resolve_client(peer, xff, snap.trusted)
        ctx.client = client
        if client is peer:
            ctx.client_ip = peer_text
        else:
            ctx.client_ip = str(client) if client is not None else "-"
        ctx.ban_key = decisions.client_key(snap, client, ctx.client_ip)
        rid = headers.get(snap.rid_field)
        if rid is None or not REQUEST_ID_RE.fullmatch(rid):
            rid = self._next_rid()
        ctx.rid = rid
        request.rid = rid
        request.response_headers = snap.response_headers
        request.https = via_proxy and forwarded_proto(headers) == "https"
        return via_proxy

    def _next_rid(self) -> str:
        """The prefix and the counter as 16 hex digits: ``"%016x"`` formatted only once
        in 256 requests, a table entry appended the others."""
        seq = self._rid_seq
        self._rid_seq = seq + 1
        low = seq & 0xFF
        if low == 0:
            self._rid_head = f"{self._rid_prefix}{seq >> 8:014x}"
        return self._rid_head + _HEX2[low]

    async def admit(
        self, request: AnyRequest, snap: Snapshot, ctx: Ctx
    ) -> tuple[UpstreamState, str]:
        """Every decision before the upstream is touched: the upstream the request goes to
        and the target sent to it, or a :class:`Reject`. It counts what a request spends
        (scores, rate-limit budgets) but holds nothing."""
        rt = self.rt
        client = ctx.client
        if client is not None:
            ctx.exempt = decisions.check_lists(snap, client, rt.allow)
            if not ctx.exempt:
                ban = rt.bans.banned(ctx.ban_key)
                if ban is not None:
                    raise banned(snap, ban.expires_at)

        ctx.underscores = decisions.check_head(
            snap,
            request.header_bytes,
            request.target_host() if snap.allowed_hosts else None,
            request.header_fields,
        )
        headers = request.headers

        method = request.method
        decisions.check_method(method)
        raw_path_qs = request.raw_path
        if not raw_path_qs.startswith("/"):
            raw_path_qs = decisions.origin_form(request.rel_url)
        canonical = decisions.canonical_target(raw_path_qs)
        ctx.path = canonical
        key = canonical.lower()

        if snap.abuse_enabled and not ctx.exempt and snap.suspicious.matches(key):
            # scored before it is answered: its evidence has no status
            seen = Seen(method, canonical, None, ctx.rid)
            rt.bans.report(ctx.ban_key, "suspicious_path", seen)
            ban = rt.bans.banned(ctx.ban_key)
            if ban is not None:
                raise banned(snap, ban.expires_at)

        route = decisions.route_for(snap, key, raw_path_qs)
        ctx.route = route
        decisions.guard_route(route, method, client, headers)
        ident = NO_IDENTITY
        if route.needs_identity:
            ident = decisions.identify(
                snap,
                route,
                headers,
                client=ctx.ban_key if client is not None else None,
                failures=rt.verify_failures,
                record=rt.count_identity,
            )
            ctx.identity = ident.label
            decisions.check_auth(route, ident)

        body = _NO_BODY
        if route.needs_body and route.policies and not ctx.exempt:
            body = await self.leg.read_json(request, snap, ctx)

        rl_headers = None
        if route.policies and not ctx.exempt:
            # the route's budgets, spent (inline: no coroutine of its own on every request)
            ip = ctx.ban_key if client is not None else "-"
            found: Sequence[Decision] | None
            limiter = rt.limiter
            try:
                if route.ip_keyed:  # the common case: no Check objects unless Redis is asked
                    found = limiter.decide_key(route.rates, ip, route.cost)
                    if found is None:  # the shared backend is asked (an await only then)
                        found = await limiter.submit_key(route.rates, ip, route.cost)
                else:
                    applied, checks = decisions.policy_checks(
                        route,
                        ip,
                        headers,
                        decoded=request.fields_decoded,
                        ident=ident,
                        body=body,
                    )
                    found = limiter.decide_local(checks)
                    if found is None:
                        found = await limiter.submit(checks)
            except BackendUnavailable as exc:
                raise Reject(
                    503,
                    "the rate-limit backend is unavailable",
                    headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
                    type_=problem.problem_type("ratelimit-unavailable"),
                ) from None
            pols = route.policies if route.ip_keyed else applied
            self._count_limits(ctx, route, pols, found)
            refused, rl_headers = decisions.limit_outcome(pols, found, limiter.wall_clock)
            if refused is not None:
                raise refused

        decisions.check_size(snap, request.content_length)

        up = snap.upstreams[route.upstream]
        ctx.upstream = up.name
        if rl_headers:
            request.extra_headers = rl_headers
        return up, raw_path_qs

    def take_inflight(
        self, request: AnyRequest, ctx: Ctx, route: CompiledRoute
    ) -> list[tuple[str, str]]:
        """Count the request for each concurrency policy of the route (SPEC section 10);
        a key with ``max_inflight`` requests in flight is refused (429, Retry-After: 1).
        What it returns is to be released when the request ends."""
        rt = self.rt
        counts = rt.inflight_keys
        ip = ctx.ban_key if ctx.client is not None else "-"
        held: list[tuple[str, str]] = []
        # every key first: one that cannot be computed (a 400) must not leave the slots of
        # the policies before it taken for good
        keys = [
            decisions.policy_key_of(pol, route, ip, request.headers, decoded=request.fields_decoded)
            for pol in route.inflight
        ]
        # (no strict=: a keyword zip is a generic call in the compiled build; keys were
        # made from route.inflight, one each)
        for pol, key in zip(route.inflight, keys):  # noqa: B905
            if counts.take(pol.name, key, pol.limit):
                held.append((pol.name, key))
                rt.rl_counters(pol.name)[0].inc()
            elif pol.shadow:
                rt.rl_counters(pol.name)[2].inc()
            else:
                rt.rl_counters(pol.name)[1].inc()
                for name, k in held:
                    counts.release(name, k)
                request.extra_headers = None  # no RateLimit fields on this refusal
                raise too_many_in_flight(pol.name)
        return held

    def _count_limits(
        self,
        ctx: Ctx,
        route: CompiledRoute,
        policies: Sequence[CompiledPolicy],
        found: Sequence[Decision],
    ) -> None:
        """Count the decisions; log the shadow refusals and the enforced ones (capped)."""
        rt = self.rt
        retry = -1.0
        names: list[str] = []
        made = rt.rl_by_policy
        # (lengths: limit_outcome, called next with the same lists, checks them)
        for pol, dec in zip(policies, found):  # noqa: B905
            if dec.allowed:
                counters = made.get(pol.name)  # (made by rl_counters: no call once made)
                (counters if counters is not None else rt.rl_counters(pol.name))[0].inc()
            elif pol.shadow:
                rt.rl_counters(pol.name)[2].inc()
                dropped = rt.shadow_log_budget.take(self._loop.time())
                if dropped is not None:
                    rt.log.info(
                        "rate_limit_shadow",
                        policy=pol.name,
                        client_ip=ctx.client_ip,
                        route=route.name,
                        request_id=ctx.rid,
                        retry_after_s=round(dec.retry_after_s, 3),
                        suppressed=dropped,
                    )
            else:
                rt.rl_counters(pol.name)[1].inc()
                names.append(pol.name)
                retry = max(retry, dec.retry_after_s)
        if names:
            rt.top_limited.add(ctx.ban_key, _time())
            dropped = rt.limited_log_budget.take(self._loop.time())
            if dropped is not None:
                rt.log.info(
                    "rate_limited",
                    policies=names,
                    client_ip=ctx.client_ip,
                    route=route.name,
                    request_id=ctx.rid,
                    retry_after_s=round(retry, 3),
                    suppressed=dropped,
                )

    # ------------------------------------------------------------------ outcome

    def reject(self, request: AnyRequest, snap: Snapshot, ctx: Ctx, rej: Reject) -> Response:
        """Count and score a refusal; its answer."""
        ctx.status = rej.status
        if rej.kind is not None and ctx.upstream is not None:
            snap.upstreams[ctx.upstream].errors[rej.kind].inc()
        if (
            rej.event is not None
            and snap.abuse_enabled
            and not ctx.exempt
            and ctx.client is not None
        ):
            seen = Seen(request.method, ctx.path, rej.status, ctx.rid)
            self.rt.bans.report(ctx.ban_key, rej.event, seen)
        # what follows on this connection may be tunnel data, not a request
        resp = problem_answer(
            rej,
            ctx.rid,
            close=request.method == "CONNECT" or _UPGRADE in request.headers,
        )
        ctx.bytes_out = len(resp.body or b"")
        # RateLimit headers of an allowed request must not reach an error that came later
        if rej.status != 429:
            request.extra_headers = None
        return resp

    def record(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        status: int,
    ) -> None:
        """The request's metrics and access log line."""
        rt = self.rt
        duration = self._loop.time() - ctx.start
        route = ctx.route.name if ctx.route is not None else NO_ROUTE
        method = request.method
        label = method if method in KNOWN_METHODS else "OTHER"
        now = _time()  # one reading for the route's figures and the log line
        rt.count_request(route, label, status, duration, now)
        trace = ctx.trace
        if trace is not None and trace.sampled and rt.spans is not None:
            rt.spans.export(trace, label, route, status, ctx.upstream, duration_s=duration)
        ratio = snap.sample_ratio
        if status >= 500 or (ratio > 0 and (ratio >= 1 or _random() < ratio)):
            rt.access_log.request(
                request_id=ctx.rid,
                client_ip=ctx.client_ip,
                method=method,
                path=request.path,
                route=route,
                status=status,
                duration_ms=milliseconds(duration),
                size=ctx.bytes_out,
                upstream=ctx.upstream,
                trace_id=trace.trace_id if trace is not None else None,
                identity=ctx.identity,
                now=now,
            )
