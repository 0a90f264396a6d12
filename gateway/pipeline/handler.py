"""The request pipeline of the proxy port, as plain calls in SPEC order.

    client IP -> request id -> probes -> deny/allow lists and bans -> host check
      -> route match -> route guards -> rate limits -> breaker / bulkhead
      -> stream to upstream -> (headers in the prepare hook) -> metrics + access log

Each step either passes or raises :class:`Reject`, which becomes one problem+json
response; what was decided is recorded once at the end.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import hdrs, web

from gateway import problem
from gateway.core.framing import FramingError, request_host
from gateway.core.keys import policy_key, wire_form
from gateway.core.paths import PathError, canonical_path
from gateway.core.retry import IDEMPOTENT_METHODS, backoff_s
from gateway.core.wsguard import admission
from gateway.downstream.messages import Body, BodyError, Request, Response
from gateway.health.probes import PROBE_PATHS, probe_answer
from gateway.pipeline.client_ip import forwarded_values, parse_ip, resolve_client
from gateway.pipeline.headers import UPSTREAM_SKIP
from gateway.pipeline.snapshot import ALLOW_ANY, KNOWN_METHODS, REQUEST_ID_RE
from gateway.stores.limiter import BackendUnavailable, Check
from gateway.upstream.client import filter_header_lines, filter_header_list, header_pairs, splice_ws
from gateway.upstream.pool import HEAD_TOO_LARGE, LeanResponse, UpstreamError

if TYPE_CHECKING:
    from gateway.core.gcra import Decision
    from gateway.downstream.messages import AnyResponse
    from gateway.downstream.protocol import HttpProtocol
    from gateway.downstream.upgrade import GatewayProtocol, GatewayRequest
    from gateway.pipeline.client_ip import IPAddress
    from gateway.pipeline.snapshot import CompiledPolicy, CompiledRoute, Snapshot
    from gateway.runtime import Runtime
    from gateway.upstream.state import UpstreamState

    AnyRequest = Request | GatewayRequest

_PROBES = frozenset(PROBE_PATHS)
_DROP_FAST = frozenset(("content-length",))  # the server sets its own
_NO_DROP: frozenset[str] = frozenset()


class Reject(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Stop the pipeline with a problem+json answer."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        event: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type_ = type_
        self.headers = headers
        self.extra = extra
        self.event = event  # abuse event to score
        self.kind = kind  # upstream error kind to count


class _BodyError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Ctx:
    """Per-request facts gathered along the pipeline (for the log line and metrics)."""

    __slots__ = (
        "ban_key",
        "body_error",
        "body_open",
        "bytes_out",
        "client",
        "client_ip",
        "exempt",
        "held",
        "rid",
        "route",
        "start",
        "status",
        "underscores",
        "upstream",
        "xff",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.xff: str | None = None
        self.rid = ""
        self.client: IPAddress | None = None
        self.client_ip = ""
        self.ban_key = ""  # the client's key for scores, bans and limits (IPv6: its prefix)
        self.exempt = False
        self.route: CompiledRoute | None = None
        self.upstream: str | None = None
        self.status = 0
        self.bytes_out = 0
        self.body_error: _BodyError | None = None
        self.underscores: str | None = None  # how fields named with "_" go upstream
        self.held = 0  # body bytes read and kept before the upstream exchange
        self.body_open = False  # a streamed body still has bytes to come from the client


def _quota_reject(violated: list[tuple[CompiledPolicy, Decision]], retry: float) -> Reject:
    names = [p.name for p, _ in violated]
    return Reject(
        429,
        f"rate limit exceeded: {', '.join(names)}",
        type_=problem.QUOTA_EXCEEDED,
        headers={
            "Retry-After": str(max(1, math.ceil(retry))),
            "RateLimit-Policy": ", ".join(p.policy_header for p, _ in violated),
            "RateLimit": ", ".join(
                f'"{p.name}";r=0;t={max(1, math.ceil(d.reset_s))}' for p, d in violated
            ),
        },
        extra={"violated_policies": names},
        event="rate_limited",
    )


def _proto(headers: Any) -> str:
    """The scheme a trusted proxy says the client used ("" when it says nothing)."""
    p = headers.get(hdrs.X_FORWARDED_PROTO)
    if p:
        return str(p).split(",", 1)[0].strip().lower()
    if hdrs.FORWARDED in headers:
        protos = forwarded_values(headers[hdrs.FORWARDED], "proto")
        if protos:
            return protos[0].lower()
    return ""


def _bulkhead_full(up: UpstreamState, what: str) -> Reject:
    return Reject(
        503,
        f"upstream {up.name!r} has too many {what}",
        type_=problem.problem_type("bulkhead-full"),
        headers={"Retry-After": "1"},
        kind="bulkhead_full",
    )


def _buffers_full() -> Reject:
    return Reject(
        503,
        "too many request bodies are being received: try again",
        type_=problem.problem_type("body-buffers-full"),
        headers={"Retry-After": "1"},
    )


def _circuit_open(up: UpstreamState, now: float) -> Reject:
    return Reject(
        503,
        f"upstream {up.name!r} is failing: circuit open",
        type_=problem.problem_type("circuit-open"),
        headers={"Retry-After": str(max(1, math.ceil(up.breaker.retry_after(now))))},
        kind="circuit_open",
    )


def _upgrade_host(request: GatewayRequest) -> str | None:
    """The host of an upgrade request (its head passed the framing rules already, in the
    HTTP/1.1 server, before it was handed over)."""
    version = request.version
    try:
        return request_host(
            f"{version.major}.{version.minor}",
            request.headers.getall(hdrs.HOST, []),
            request.raw_path,
        )
    except FramingError:
        return None


def _peer(request: AnyRequest) -> IPAddress | None:
    protocol: GatewayProtocol | HttpProtocol = request.protocol  # type: ignore[assignment]
    return protocol.peer_address()[0]


class ProxyHandler:
    """Callable handed to the proxy port's server; one per gateway process."""

    __slots__ = ("_loop", "_rid_prefix", "_rid_seq", "buffered", "rt")

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._loop = asyncio.get_running_loop()
        # request ids: a random per-process prefix and a counter (unique, no syscall)
        self._rid_prefix = secrets.token_hex(8)
        self._rid_seq = itertools.count()
        # request body bytes held by all requests before their upstream exchange
        self.buffered = 0

    # ------------------------------------------------------------------ entry

    def answer_now(self, request: Request) -> AnyResponse | None:
        """Probes (and /metrics when on this port), answered as soon as the head is parsed.

        They read cached state only, so the server writes them from its parsing callback:
        a probe never queues behind the requests of a saturated proxy.
        """
        snap = self.rt.snapshot
        resp = self._local_answer(request, snap)
        if resp is not None:
            self._identify(request, snap, Ctx(self._loop.time()))
        return resp

    def _local_answer(self, request: AnyRequest, snap: Snapshot) -> AnyResponse | None:
        """A probe's or /metrics' answer (on this port), or None for the pipeline."""
        path = request.path
        if path in _PROBES or path.startswith("/readyz/"):
            return probe_answer(request, self.rt.monitor, public=True)
        if path == "/metrics" and snap.metrics_on_proxy:
            return self.rt.metrics_response()
        return None

    def _identify(self, request: AnyRequest, snap: Snapshot, ctx: Ctx) -> bool:
        """Client address (through trusted proxies) and request id; True when via a proxy."""
        headers = request.headers
        protocol: GatewayProtocol | HttpProtocol = request.protocol  # type: ignore[assignment]

        # client IP (trusted proxies) and request id
        peer, peer_text = protocol.peer_address()
        xff = headers.get(hdrs.X_FORWARDED_FOR)
        if xff is not None:
            fields = headers.getall(hdrs.X_FORWARDED_FOR)
            if len(fields) > 1:  # several fields are one list, in order (RFC 9110 5.3)
                xff = ", ".join(fields)
        elif hdrs.FORWARDED in headers:
            # RFC 7239: its for= list is read like X-Forwarded-For
            forwarded = ", ".join(headers.getall(hdrs.FORWARDED))
            xff = ", ".join(forwarded_values(forwarded, "for")) or None
        ctx.xff = xff
        client, via_proxy = resolve_client(peer, xff, snap.trusted)
        ctx.client = client
        if client is peer:
            ctx.client_ip = peer_text
        else:
            ctx.client_ip = str(client) if client is not None else "-"
        # an IPv6 client is its prefix (rate_limit.ipv6_prefix): rotating the rest of its
        # address must not give it a clean score, a lifted ban or a fresh budget
        ctx.ban_key = (
            snap.ip_key(client, ctx.client_ip)
            if client is not None and client.version == 6
            else ctx.client_ip
        )
        rid = headers.get(snap.rid_header)
        if rid is None or not REQUEST_ID_RE.fullmatch(rid):
            rid = f"{self._rid_prefix}{next(self._rid_seq):016x}"
        ctx.rid = rid
        request.rid = rid
        request.response_headers = snap.response_headers
        request.https = via_proxy and _proto(headers) == "https"
        return via_proxy

    async def __call__(self, request: AnyRequest) -> AnyResponse | web.StreamResponse:
        snap = self.rt.snapshot
        start = self._loop.time()
        ctx = Ctx(start)
        via_proxy = self._identify(request, snap, ctx)

        local = self._local_answer(request, snap)
        if local is not None:
            return local

        try:
            resp = await self._pipeline(request, snap, ctx, via_proxy=via_proxy)
        except Reject as rej:
            resp = self._reject(request, snap, ctx, rej)
        self._record(request, snap, ctx, resp, start)
        return resp

    # ------------------------------------------------------------------ steps

    async def _pipeline(
        self, request: AnyRequest, snap: Snapshot, ctx: Ctx, *, via_proxy: bool
    ) -> AnyResponse | web.StreamResponse:
        rt = self.rt
        client = ctx.client
        if client is not None:
            if snap.has_deny and client in snap.deny:
                raise Reject(
                    403, "the client address is denied", type_=problem.problem_type("denied")
                )
            ctx.exempt = snap.has_allow and client in snap.allow
            if not ctx.exempt:
                ban = rt.bans.banned(ctx.ban_key)
                if ban is not None:
                    raise self._banned(snap, ban.expires_at)

        headers = request.headers
        if request.header_bytes > snap.max_header_bytes:
            raise Reject(431, "request header fields too large", event="bad_request")
        if snap.allowed_hosts:
            host = request.host if isinstance(request, Request) else _upgrade_host(request)
            if host not in snap.allowed_hosts:
                raise Reject(
                    400, "the Host header is not one this gateway serves", event="bad_request"
                )

        if "_" in "".join(headers):  # the field names
            # CGI and WSGI servers read X_Forwarded_For as X-Forwarded-For (SPEC 9)
            if snap.underscores == "reject":
                raise Reject(400, "a header field name holds an underscore", event="bad_request")
            ctx.underscores = snap.underscores

        method = request.method
        if method == "CONNECT":
            raise Reject(
                405,
                "CONNECT is not supported",
                headers={"Allow": ALLOW_ANY},
            )
        raw_path_qs = request.raw_path
        if not raw_path_qs.startswith("/"):
            # absolute-form target: the upstream is fixed by config; keep only path+query
            url = request.rel_url
            if not url.raw_path.startswith("/"):
                raise Reject(400, "the request target is not a path", event="bad_request")
            raw_path_qs = url.raw_path_qs
        # the one reading of the path that every decision below uses (SPEC 9); matching
        # ignores letter case, so it is lowered once
        try:
            key = canonical_path(raw_path_qs).lower()
        except PathError as exc:
            raise Reject(400, str(exc), event="bad_request") from None

        if snap.abuse_enabled and not ctx.exempt and snap.suspicious(key):
            rt.bans.report(ctx.ban_key, "suspicious_path")
            ban = rt.bans.banned(ctx.ban_key)
            if ban is not None:
                raise self._banned(snap, ban.expires_at)

        route = snap.match(key)
        if route is None:
            raise Reject(404, "no route matches this path", event="not_found")
        ctx.route = route
        methods = route.methods
        if (method not in methods) if methods is not None else (method == "TRACE"):
            # TRACE echoes the request, credentials included: only where a route lists it
            raise Reject(
                405, f"{method} is not allowed on this route", headers={"Allow": route.allow}
            )
        if route.sources is not None and (client is None or client not in route.sources):
            raise Reject(
                403,
                "the client address may not use this route",
                type_=problem.problem_type("forbidden-source"),
            )
        if route.secret_header is not None:
            given = headers.get(route.secret_header)
            if (
                route.secret is None
                or given is None
                or not hmac.compare_digest(given.encode(), route.secret)
            ):
                raise Reject(
                    403,
                    "missing or wrong shared secret",
                    type_=problem.problem_type("forbidden"),
                    event="auth_failure",
                )

        rl_headers: list[tuple[str, str]] | None = None
        if route.policies and not ctx.exempt:
            ip = ctx.ban_key if client is not None else "-"
            decisions: Sequence[Decision] | None
            limiter = rt.limiter
            try:
                if route.ip_keyed:  # the common case: no Check objects unless Redis is asked
                    decisions = limiter.decide_key(route.rates, ip)
                    if decisions is None:  # the shared backend is asked (an await only then)
                        decisions = await limiter.submit_key(route.rates, ip)
                else:
                    checks = [
                        Check(p.name, p.rate, self._key(request, ip, p, route))
                        for p in route.policies
                    ]
                    decisions = limiter.decide_local(checks)
                    if decisions is None:
                        decisions = await limiter.submit(checks)
            except BackendUnavailable as exc:
                raise Reject(
                    503,
                    "the rate-limit backend is unavailable",
                    headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
                    type_=problem.problem_type("ratelimit-unavailable"),
                ) from None
            rl_headers = self._rate_limit(ctx, route, decisions)

        clen = request.content_length
        if clen is not None and clen > snap.max_body_bytes:
            raise Reject(
                413,
                f"the request body is larger than {snap.max_body_bytes} bytes",
                event="bad_request",
            )

        up = rt.upstreams[route.upstream]
        ctx.upstream = up.name
        if rl_headers:
            request.extra_headers = rl_headers
        if headers.get(hdrs.UPGRADE, "").lower() == "websocket" and method == "GET":
            if isinstance(request, Request):  # the upgrade protocol takes real upgrades
                raise Reject(
                    400, "a WebSocket upgrade needs Connection: Upgrade", event="bad_request"
                )
            return await self._websocket(request, snap, ctx, up, raw_path_qs, via_proxy=via_proxy)
        return await self._forward(request, snap, ctx, up, raw_path_qs, via_proxy=via_proxy)

    def _banned(self, snap: Snapshot, expires_at: float) -> Reject:
        retry = max(1, math.ceil(expires_at - time.time()))
        if snap.ban_status == 429:
            return Reject(
                429,
                "the client is temporarily banned for abnormal usage",
                type_=problem.ABNORMAL_USAGE,
                headers={"Retry-After": str(retry)},
            )
        hdr = {"Retry-After": str(retry)} if snap.ban_status == 503 else None
        return Reject(
            snap.ban_status,
            "the client is temporarily banned",
            type_=problem.problem_type("banned"),
            headers=hdr,
        )

    @staticmethod
    def _key(request: AnyRequest, ip: str, pol: CompiledPolicy, route: CompiledRoute) -> str:
        """The client key of one policy; ``ip`` is the client address's key."""
        header = pol.header
        value = None
        if header:
            values = request.headers.getall(header, ())
            if len(values) > 1:
                # whose budget? the upstream may read another one than the key would
                raise Reject(400, f"more than one {header} field", event="bad_request")
            if values:
                value = values[0]
                if not isinstance(request, Request):  # aiohttp decoded it as UTF-8
                    value = wire_form(value)
        return policy_key(pol.key, ip, route.name, header, value)

    def _rate_limit(
        self, ctx: Ctx, route: CompiledRoute, decisions: Sequence[Decision]
    ) -> list[tuple[str, str]] | None:
        """Count the decisions; raise the 429 or return the RateLimit headers to send."""
        rt = self.rt
        violated: list[tuple[CompiledPolicy, Decision]] | None = None
        tightest: CompiledPolicy | None = None
        least = 0
        for pol, dec in zip(route.policies, decisions, strict=True):
            if dec.allowed:
                rt.rl_counters(pol.name)[0].inc()
                if not pol.shadow and (tightest is None or dec.remaining < least):
                    tightest, least, reset = pol, dec.remaining, dec.reset_s
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
                if violated is None:
                    violated = []
                violated.append((pol, dec))
        if violated:
            retry = max(d.retry_after_s for _, d in violated)
            dropped = rt.limited_log_budget.take(self._loop.time())
            if dropped is not None:
                rt.log.info(
                    "rate_limited",
                    policies=[p.name for p, _ in violated],
                    client_ip=ctx.client_ip,
                    route=route.name,
                    request_id=ctx.rid,
                    retry_after_s=round(retry, 3),
                    suppressed=dropped,
                )
            raise _quota_reject(violated, retry)
        if tightest is None:
            return None
        return [
            ("RateLimit-Policy", tightest.policy_header),
            ("RateLimit", f'"{tightest.name}";r={least};t={math.ceil(reset)}'),
        ]

    # ------------------------------------------------------------------ upstream

    def _upstream_fields(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        up: UpstreamState,
        *,
        via_proxy: bool,
    ) -> str:
        r"""The header fields sent upstream, as ``Name: value\r\n`` lines: the client's
        end-to-end fields, then Host, X-Forwarded-*, X-Real-IP and the request id (the
        upstream's own Host last when the client sent none)."""
        headers = request.headers
        kept = filter_header_lines(headers, snap.drop_upstream, ctx.underscores)
        host = headers.get(hdrs.HOST)
        chain = ctx.client_ip
        proto = "http"
        fwd_host = host
        if via_proxy:
            chain = forwarded_chain(ctx.xff, request, snap, ctx)
            proto = _proto(headers) or "http"
            h = headers.get(hdrs.X_FORWARDED_HOST)
            if h:
                fwd_host = h.split(",", 1)[0].strip()
            elif hdrs.FORWARDED in headers:
                hosts = forwarded_values(headers[hdrs.FORWARDED], "host")
                if hosts:
                    fwd_host = hosts[0]
        if host is not None:
            kept.append(f"Host: {host}\r\n")
        xfh = f"X-Forwarded-Host: {fwd_host}\r\n" if fwd_host is not None else ""
        kept.append(  # one string for the fields the gateway sets
            f"X-Forwarded-For: {chain}\r\nX-Forwarded-Proto: {proto}\r\n{xfh}"
            f"X-Real-IP: {ctx.client_ip}\r\n{snap.rid_header}: {ctx.rid}\r\n"
        )
        if host is None:
            kept.append(f"Host: {up.client.host_header}\r\n")
        return "".join(kept)

    def _too_large(self, ctx: Ctx, limit: int) -> _BodyError:
        ctx.body_error = _BodyError(413, f"the request body is larger than {limit} bytes")
        return ctx.body_error

    def _hold(self, snap: Snapshot, ctx: Ctx, n: int) -> None:
        """Count ``n`` more body bytes held before the upstream exchange; 503 past the cap."""
        ctx.held += n
        self.buffered += n
        if self.buffered > snap.max_buffered_bytes:
            raise _buffers_full()

    def _unhold(self, ctx: Ctx) -> None:
        self.buffered -= ctx.held
        ctx.held = 0

    async def _buffer(
        self, request: AnyRequest, snap: Snapshot, ctx: Ctx, held: list[bytes]
    ) -> bool:
        """Read the body into ``held`` before an upstream connection is taken: all of it
        up to ``buffer_body_bytes`` (True), else that much and the rest is streamed (False).

        A client that trickles its body holds no pool connection meanwhile, only the bytes
        it sent, within ``client_timeout_s`` of its request's start.
        """
        clen = request.content_length
        if clen is not None and self.buffered + min(clen, snap.buffer_body_bytes) > (
            snap.max_buffered_bytes
        ):
            raise _buffers_full()  # before a 100 Continue invites the body
        if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
            await request.send_continue()
        limit = snap.buffer_body_bytes
        max_body = snap.max_body_bytes
        content = request.content
        total = 0
        try:
            async with asyncio.timeout_at(ctx.start + snap.client_timeout_s):
                if isinstance(content, Body):  # the proxy port's own server: no joined copies
                    while True:
                        n = content.take_into(held)
                        if n:
                            total += n
                            if total > max_body:
                                raise self._too_large(ctx, max_body)
                            self._hold(snap, ctx, n)
                        if content.complete:
                            return True
                        if total >= limit:
                            return False
                        await content.wait()
                while total < limit:  # a request of the upgrade protocol (aiohttp's reader)
                    chunk = await content.readany()
                    if not chunk:
                        return True
                    total += len(chunk)
                    if total > max_body:
                        raise self._too_large(ctx, max_body)
                    held.append(chunk)
                    self._hold(snap, ctx, len(chunk))
                return False
        except TimeoutError:
            ctx.body_error = _BodyError(408, "the request body was not received in time")
        except (aiohttp.ClientPayloadError, BodyError) as exc:
            ctx.body_error = _BodyError(400, f"malformed request body: {exc}")
        raise ctx.body_error

    async def _stream(
        self, request: AnyRequest, snap: Snapshot, ctx: Ctx, held: list[bytes], end: float
    ) -> AsyncIterator[bytes]:
        """The buffered start of a large body, then the rest as it arrives: a pause of
        ``body_idle_s``, or the exchange's end (``end``) reached, is a 408 (the upstream
        connection is then closed at once, not reused)."""
        ctx.body_open = True
        total = 0
        for chunk in held:
            total += len(chunk)
            yield chunk
        held.clear()
        self._unhold(ctx)  # with the upstream now: no longer held here
        loop = self._loop
        limit = snap.max_body_bytes
        idle = snap.body_idle_s
        content = request.content
        while True:
            by = loop.time() + idle
            try:
                async with asyncio.timeout_at(min(by, end)):
                    chunk = await content.readany()
            except TimeoutError:
                detail = (
                    f"the request body stalled for {idle:g} s"
                    if by <= end
                    else "the request body was not received in time"
                )
                ctx.body_error = _BodyError(408, detail)
                raise ctx.body_error from None
            except (aiohttp.ClientPayloadError, BodyError) as exc:
                ctx.body_error = _BodyError(400, f"malformed request body: {exc}")
                raise ctx.body_error from None
            if not chunk:
                ctx.body_open = False
                return
            total += len(chunk)
            if total > limit:
                raise self._too_large(ctx, limit)
            yield chunk

    async def _body_first(
        self, request: AnyRequest, snap: Snapshot, ctx: Ctx
    ) -> tuple[list[bytes], bool]:
        """The body read before anything of the upstream is taken (bulkhead, pool): all
        of it up to ``buffer_body_bytes`` (True), else that much (False)."""
        content = request.content
        whole = content.take_whole() if type(content) is Body else None
        if whole is not None:  # the common small body, all here: no wait
            if len(whole) > snap.max_body_bytes:
                raise Reject(
                    413,
                    f"the request body is larger than {snap.max_body_bytes} bytes",
                    event="bad_request",
                )
            self._hold(snap, ctx, len(whole))
            return [whole], True
        held: list[bytes] = []
        try:
            return held, await self._buffer(request, snap, ctx, held)
        except _BodyError as body_err:
            raise Reject(body_err.status, str(body_err), event="bad_request") from None

    async def _send(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        up: UpstreamState,
        raw_path_qs: str,
        up_fields: str,
        held: list[bytes] | None,
        eof: bool,
    ) -> tuple[LeanResponse, float]:
        """Send with breaker and bounded retries; return (response, start time).

        ``held``: the body read before (all of it when ``eof``), None without a body.
        """
        loop = self._loop
        method = request.method
        retries = up.config.retries
        # a body read whole before sending can be sent again
        idempotent = method in IDEMPOTENT_METHODS and eof
        now = loop.time()
        up.budget.record_request(now)
        attempt = 0
        while True:
            now = loop.time()
            if not up.breaker.acquire(now):
                raise _circuit_open(up, now)
            t0 = loop.time()
            body: AsyncIterator[bytes] | list[bytes] | None = held
            if not eof:
                assert held is not None  # noqa: S101 - a body was begun
                body = self._stream(request, snap, ctx, held, t0 + up.config.timeout_s)
            try:
                resp = await up.client.send(
                    method,
                    raw_path_qs,
                    up_fields,
                    body,
                    has_length=request.content_length is not None,
                )
            except asyncio.CancelledError:
                up.breaker.release(loop.time())  # the client went away: no outcome
                raise
            except _BodyError as body_err:
                up.breaker.release(loop.time())  # the client's fault, not the upstream's
                raise Reject(body_err.status, str(body_err), event="bad_request") from None
            except UpstreamError as exc:
                t1 = loop.time()
                if ctx.body_error is not None:
                    up.breaker.release(t1)
                    err = ctx.body_error
                    raise Reject(err.status, str(err), event="bad_request") from None
                if exc.kind == "timeout" and ctx.body_open:
                    # the client was still sending its body: its slowness, not the upstream's
                    up.breaker.release(t1)
                    raise Reject(
                        408, "the request body was not received in time", event="bad_request"
                    ) from None
                self._upstream_error(up, ctx, exc)
                if exc.kind == "timeout" and not exc.sent:
                    # no pool connection came free in time: the upstream never saw it
                    up.breaker.release(t1)
                    raise Reject(504, f"upstream {up.name!r} did not answer in time") from None
                up.breaker.record(t1, failure=True)
                attempt += 1
                if (
                    not exc.sent
                    and idempotent
                    and attempt < retries.attempts
                    and up.budget.can_retry(t1)
                ):
                    up.budget.record_retry(t1)
                    await asyncio.sleep(backoff_s(attempt - 1, retries, random.random()))
                    continue
                if exc.kind == "timeout":
                    raise Reject(504, f"upstream {up.name!r} did not answer in time") from None
                if exc.kind == HEAD_TOO_LARGE:
                    raise Reject(
                        502, f"upstream {up.name!r} answered with a response head too large"
                    ) from None
                raise Reject(
                    502, f"upstream {up.name!r} is unreachable: {exc.kind} error"
                ) from None
            return resp, t0

    def _upstream_error(self, up: UpstreamState, ctx: Ctx, exc: UpstreamError) -> None:
        """Count an upstream error; log an answer refused for its head (the 502's cause
        is the upstream's, and an operator cannot tell it from the access log)."""
        up.errors[exc.kind].inc()
        if exc.kind == HEAD_TOO_LARGE:
            self.rt.log.warning(
                "upstream_response_rejected",
                upstream=up.name,
                reason=str(exc),
                route=ctx.route.name if ctx.route is not None else None,
                request_id=ctx.rid,
            )

    async def _forward(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        up: UpstreamState,
        raw_path_qs: str,
        *,
        via_proxy: bool,
    ) -> Response:
        held: list[bytes] | None = None
        eof = True
        if request.body_exists:
            # before the bulkhead: a client slow to send its body holds no upstream resource
            try:
                held, eof = await self._body_first(request, snap, ctx)
            except BaseException:
                if ctx.held:
                    self._unhold(ctx)
                raise
        if up.inflight >= up.max_inflight:
            if ctx.held:
                self._unhold(ctx)
            raise _bulkhead_full(up, "requests in flight")
        up.inflight += 1
        up.inflight_gauge.inc()
        try:
            up_fields = self._upstream_fields(request, snap, ctx, up, via_proxy=via_proxy)
            up_resp, t0 = await self._send(
                request, snap, ctx, up, raw_path_qs, up_fields, held, eof
            )
            if held:  # sent: its bytes go now, not when the answer is over
                held.clear()
                self._unhold(ctx)
            try:
                now = self._loop.time()
                elapsed = now - t0
                up.duration.observe(elapsed)
                status = up_resp.status
                up.breaker.record(now, failure=up.breaker.is_failure(status, elapsed))
                ctx.status = status
                if not ctx.exempt and (status == 404 or status in (401, 403)):
                    self.rt.bans.report(
                        ctx.ban_key, "not_found" if status == 404 else "auth_failure"
                    )
                body = (
                    up_resp.body_if_complete()
                    if status >= 200 and status not in (204, 304) and request.method != "HEAD"
                    else None
                )
                if body is not None:
                    # all of it is here: headers and body leave in one write
                    ctx.bytes_out = len(body)
                    if up_resp.listed:  # Connection names more fields to drop
                        fields = filter_header_list(up_resp.header_list, _DROP_FAST)
                        return Response(status, up_resp.reason, fields, body)
                    # filtered where the gateway's own fields are applied: one pass
                    return Response(
                        status, up_resp.reason, up_resp.header_list, body, UPSTREAM_SKIP
                    )
                resp = await request.start_stream(
                    status, up_resp.reason, filter_header_list(up_resp.header_list, _NO_DROP)
                )
                written = 0
                async for chunk in up_resp.iter_body():
                    await request.write(chunk)
                    written += len(chunk)
                ctx.bytes_out = written
                await request.write_eof()
            except UpstreamError as exc:
                # the upstream failed mid-response: nothing sane can follow on this connection
                self._upstream_error(up, ctx, exc)
                ctx.status = ctx.status or 502
                up_resp.close()
                if request.transport is not None:
                    request.transport.close()
                raise ConnectionResetError from exc
            finally:
                up_resp.release()
            return resp
        finally:
            up.inflight -= 1
            up.inflight_gauge.dec()
            if ctx.held:  # the send failed with the body still held
                self._unhold(ctx)

    async def _websocket(
        self,
        request: GatewayRequest,
        snap: Snapshot,
        ctx: Ctx,
        up: UpstreamState,
        raw_path_qs: str,
        *,
        via_proxy: bool,
    ) -> web.StreamResponse:
        headers = request.headers
        protocols = [
            p.strip() for p in headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",") if p.strip()
        ]
        # the handshake prepare() will check (version, key), before the upstream is bothered
        if not web.WebSocketResponse().can_prepare(request).ok:
            raise Reject(
                400,
                "not a valid WebSocket handshake",
                event="bad_request",
                headers={hdrs.SEC_WEBSOCKET_VERSION: "13"},  # the one spoken (RFC 6455 4.4)
            )
        registry = self.rt.websockets
        refused = admission(
            registry.open_for(ctx.ban_key),
            snap.settings.config.websocket.max_per_client,
            registry.open_to(up.name),
            up.config.max_connections,
        )
        if refused == "client":
            raise Reject(
                503,
                "the client has too many WebSockets open",
                type_=problem.problem_type("too-many-websockets"),
                headers={"Retry-After": "1"},
            )
        if refused == "upstream":
            raise _bulkhead_full(up, "WebSockets open")
        up_headers = header_pairs(
            self._upstream_fields(request, snap, ctx, up, via_proxy=via_proxy)
        )
        up_headers = [h for h in up_headers if not h[0].lower().startswith("sec-websocket-")]
        # a message is held whole before it is passed on: it is bounded like a body
        # (aiohttp refuses one of max_msg_size bytes or more, and stops inflating there)
        max_msg = snap.max_body_bytes + 1
        now = self._loop.time()
        if not up.breaker.acquire(now):
            raise _circuit_open(up, now)
        sock = registry.add(ctx.ban_key, ctx.client, up.name, exempt=ctx.exempt)
        up.websockets += 1
        try:
            try:
                up_ws = await up.client.ws_connect(
                    raw_path_qs, up_headers, protocols, max_msg_size=max_msg
                )
            except UpstreamError as exc:
                up.breaker.record(self._loop.time(), failure=True)
                self._upstream_error(up, ctx, exc)
                # the kind only, as for a request: the error's text names internal addresses
                raise Reject(
                    502 if exc.kind != "timeout" else 504,
                    f"upstream {up.name!r} is unreachable: {exc.kind} error",
                ) from None
            except aiohttp.WSServerHandshakeError as exc:
                up.breaker.record(self._loop.time(), failure=exc.status >= 500)
                raise Reject(
                    502, f"upstream {up.name!r} refused the WebSocket upgrade ({exc.status})"
                ) from None
            up.breaker.record(self._loop.time(), failure=False)
            ws = web.WebSocketResponse(
                protocols=[up_ws.protocol] if up_ws.protocol else (),
                autoping=False,
                autoclose=False,
                max_msg_size=max_msg,
                compress=False,  # no permessage-deflate toward clients: no inflating bombs
            )
            try:
                await ws.prepare(request)
            except ConnectionError:
                # the client went away during the upstream handshake: no error of anyone's
                # (aiohttp takes the answer's failed write as the client gone, quietly)
                await up_ws.close()
                ctx.status = 499
                return web.Response(status=499)
            except BaseException:
                await up_ws.close()
                raise
            ctx.status = 101
            registry.attach(sock, ws, request.transport, self._loop.time())
            await splice_ws(ws, up_ws, sock)
        finally:
            registry.remove(sock)
            up.websockets -= 1
        return ws

    # ------------------------------------------------------------------ outcome

    def _reject(self, request: AnyRequest, snap: Snapshot, ctx: Ctx, rej: Reject) -> Response:
        ctx.status = rej.status
        if rej.kind is not None and ctx.upstream is not None:
            self.rt.upstreams[ctx.upstream].errors[rej.kind].inc()
        if (
            rej.event is not None
            and snap.abuse_enabled
            and not ctx.exempt
            and ctx.client is not None
        ):
            self.rt.bans.report(ctx.ban_key, rej.event)
        # a plain answer (the upgrade protocol's server converts it when it serves one)
        body = problem.problem_body(
            rej.status, rej.detail, request_id=ctx.rid, type_=rej.type_, extra=rej.extra
        )
        fields = [*rej.headers.items()] if rej.headers else []
        fields.append((hdrs.CONTENT_TYPE, problem.CONTENT_TYPE))
        resp = Response(rej.status, None, fields, body)
        if (
            rej.status in (400, 408, 413, 431)
            or request.method == "CONNECT"
            or hdrs.UPGRADE in request.headers
        ):
            # what follows on this connection may be tunnel data, not a request
            resp.force_close()
        ctx.bytes_out = len(body)
        # RateLimit headers of an allowed request must not reach an error that came later
        if rej.status != 429:
            request.extra_headers = None
        return resp

    def _record(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        resp: AnyResponse | web.StreamResponse,
        start: float,
    ) -> None:
        rt = self.rt
        status = ctx.status or resp.status
        duration = self._loop.time() - start
        route = ctx.route.name if ctx.route is not None else "none"
        method = request.method if request.method in KNOWN_METHODS else "OTHER"
        rt.count_request(route, method, status, duration)
        ratio = snap.sample_ratio
        if status >= 500 or (ratio > 0 and (ratio >= 1 or random.random() < ratio)):
            rt.access_log.emit(
                {
                    "request_id": ctx.rid,
                    "client_ip": ctx.client_ip,
                    "method": request.method,
                    "path": request.path,
                    "route": route,
                    "status": status,
                    "duration_ms": round(duration * 1000, 3),
                    "bytes": ctx.bytes_out,
                    "upstream": ctx.upstream,
                }
            )


def forwarded_chain(xff: str | None, request: AnyRequest, snap: Snapshot, ctx: Ctx) -> str:
    """The X-Forwarded-For sent upstream: the client, the trusted hops after it, the peer."""
    peer = _peer(request)
    hops: list[str] = []
    if xff:
        for part in reversed(xff.split(",")):
            ip = parse_ip(part)
            if ip is None:
                break
            hops.append(str(ip))
            if ip not in snap.trusted:
                break
    hops.reverse()
    if peer is not None:
        hops.append(str(peer))
    return ", ".join(hops) if hops else ctx.client_ip
