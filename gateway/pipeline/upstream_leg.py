"""The upstream leg of a request: its body read first, the fields sent upstream, the send
with breaker and bounded retries, and the answer passed back to the client.

A body is read (up to ``buffer_body_bytes``) before anything of the upstream is taken, so
a client slow to send it holds no bulkhead slot or pool connection; the bytes so held by
all requests are capped by ``max_buffered_bytes``.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import hdrs

from gateway.core.client_ip import forwarded_chain, forwarded_proto, forwarded_values
from gateway.core.concurrency import Priority
from gateway.core.evidence import Seen
from gateway.core.retry import IDEMPOTENT_METHODS, backoff_s
from gateway.downstream.messages import BodyError, Response
from gateway.identity.body import MAX_BODY, NO_BODY, is_json_media_type, parse_body
from gateway.pipeline.body_stream import GONE, stream_body
from gateway.pipeline.context import ClientBodyError
from gateway.pipeline.headers import UPSTREAM_SKIP
from gateway.pipeline.reject import Reject, buffers_full, bulkhead_full, circuit_open
from gateway.upstream.hop_by_hop import filter_header_lines, filter_header_list
from gateway.upstream.pool import HEAD_TOO_LARGE, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from gateway.pipeline.context import Ctx
    from gateway.pipeline.request import AnyRequest
    from gateway.pipeline.snapshot import CompiledRoute, Snapshot
    from gateway.runtime import Runtime
    from gateway.upstream.state import UpstreamState

_DROP_FAST: Final = frozenset(("content-length",))  # the server sets its own
_NO_DROP: Final[frozenset[str]] = frozenset()
# module attributes of other modules, held here as constants: the compiled build reads a
# Final name directly, any other global through the module's namespace on every use
_IDEMPOTENT: Final = IDEMPOTENT_METHODS
_HOST: Final = hdrs.HOST
_X_FORWARDED_HOST: Final = hdrs.X_FORWARDED_HOST
_FORWARDED: Final = hdrs.FORWARDED
_EXPECT: Final = hdrs.EXPECT
_CONTENT_TYPE: Final = hdrs.CONTENT_TYPE
_NO_BODY: Final = NO_BODY
_MAX_BODY: Final = MAX_BODY
_is_json_media_type: Final = is_json_media_type
_parse_body: Final = parse_body
_stream_body: Final = stream_body
_timeout_at: Final = asyncio.timeout_at


def upstream_fields(
    request: AnyRequest, snap: Snapshot, ctx: Ctx, up: UpstreamState, *, via_proxy: bool
) -> str:
    r"""The header fields sent upstream, as ``Name: value\r\n`` lines: the client's
    end-to-end fields, then Host, X-Forwarded-*, X-Real-IP, the request id and the trace
    context (the upstream's own Host last when the client sent none)."""
    headers = request.headers
    kept = filter_header_lines(request.header_fields, snap.drop_upstream, ctx.underscores)
    host = headers.get(_HOST)
    chain = ctx.client_ip
    proto = "http"
    fwd_host = host
    if via_proxy:
        chain = forwarded_chain(ctx.xff, request.peer_address()[0], snap.trusted, ctx.client_ip)
        proto = forwarded_proto(headers) or "http"
        h = headers.get(_X_FORWARDED_HOST)
        if h:
            fwd_host = h.split(",", 1)[0].strip()
        elif _FORWARDED in headers:
            hosts = forwarded_values(headers[_FORWARDED], "host")
            if hosts:
                fwd_host = hosts[0]
    # the fields the gateway sets, as pieces of the one string joined below (no line is
    # made and freed on the way)
    if host is not None:
        kept.append("Host: ")
        kept.append(host)
        kept.append("\r\nX-Forwarded-For: ")
    else:
        kept.append("X-Forwarded-For: ")
    kept.append(chain)
    kept.append("\r\nX-Forwarded-Proto: ")
    kept.append(proto)
    if fwd_host is not None:
        kept.append("\r\nX-Forwarded-Host: ")
        kept.append(fwd_host)
    kept.append("\r\nX-Real-IP: ")
    kept.append(ctx.client_ip)
    kept.append("\r\n")
    kept.append(snap.rid_header)
    kept.append(": ")
    kept.append(ctx.rid)
    kept.append("\r\n")
    trace = ctx.trace
    if trace is not None:
        kept.append("traceparent: ")
        kept.append(trace.traceparent)
        kept.append("\r\n")
        if trace.tracestate is not None:
            kept.append("tracestate: ")
            kept.append(trace.tracestate)
            kept.append("\r\n")
    if host is None:
        kept.append(f"Host: {up.client.host_header}\r\n")
    if request.fields_decoded:
        # aiohttp's server decoded the values as UTF-8 (surrogates for what is not):
        # back to the bytes as sent, for the pool's latin-1 encoding of the head, as
        # the proxy port's own server keeps them (the gateway's own fields are ASCII)
        return "".join(kept).encode("utf-8", "surrogateescape").decode("latin-1")
    return "".join(kept)


def count_error(rt: Runtime, up: UpstreamState, ctx: Ctx, exc: UpstreamError) -> None:
    """Count an upstream error; log an answer refused for its head (the 502's cause
    is the upstream's, and an operator cannot tell it from the access log)."""
    up.errors[exc.kind].inc()
    if exc.kind == HEAD_TOO_LARGE:
        rt.log.warning(
            "upstream_response_rejected",
            upstream=up.name,
            reason=str(exc),
            route=ctx.route.name if ctx.route is not None else None,
            request_id=ctx.rid,
        )


class UpstreamLeg:
    """Sends requests upstream and their answers back; one per handler (it counts the
    body bytes held by all requests)."""

    __slots__ = ("_lag", "_loop", "buffered", "rt")

    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.rt = runtime
        self._loop = loop
        self._lag = runtime.monitor.loop_lag
        # request body bytes held by all requests before their upstream exchange
        self.buffered = 0

    def too_large(self, ctx: Ctx, limit: int) -> ClientBodyError:
        ctx.body_error = ClientBodyError(413, f"the request body is larger than {limit} bytes")
        return ctx.body_error

    def _hold(self, snap: Snapshot, ctx: Ctx, n: int) -> None:
        """Count ``n`` more body bytes held before the upstream exchange; 503 past the cap."""
        ctx.held += n
        self.buffered += n
        if self.buffered > snap.max_buffered_bytes:
            raise buffers_full()

    def unhold(self, ctx: Ctx) -> None:
        self.buffered -= ctx.held
        ctx.held = 0

    async def _buffer(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        held: list[bytes],
        limit: int | None = None,
    ) -> bool:
        """Read the body into ``held`` before an upstream connection is taken: all of it
        up to ``limit`` (``buffer_body_bytes`` when None: True), else that much and the
        rest is streamed (False).

        A client that trickles its body holds no pool connection meanwhile, only the bytes
        it sent, within ``client_timeout_s`` of its request's start.
        """
        clen = request.content_length
        if clen is not None and self.buffered + min(clen, snap.buffer_body_bytes) > (
            snap.max_buffered_bytes
        ):
            raise buffers_full()  # before a 100 Continue invites the body
        if request.headers.get(_EXPECT, "").lower() == "100-continue":
            await request.send_continue()
        if limit is None:
            limit = snap.buffer_body_bytes
        max_body = snap.max_body_bytes
        lean = request.lean_body()
        total = 0
        try:
            async with _timeout_at(ctx.start + snap.client_timeout_s):
                if lean is not None:  # the proxy port's own server: no joined copies
                    while True:
                        n = lean.take_into(held)
                        if n:
                            total += n
                            if total > max_body:
                                raise self.too_large(ctx, max_body)
                            self._hold(snap, ctx, n)
                        if lean.complete:
                            return True
                        if total >= limit:
                            return False
                        await lean.wait()
                reader = request.content
                while total < limit:  # a request of the upgrade protocol (aiohttp's reader)
                    chunk = await reader.readany()
                    if not chunk:
                        return True
                    total += len(chunk)
                    if total > max_body:
                        raise self.too_large(ctx, max_body)
                    held.append(chunk)
                    self._hold(snap, ctx, len(chunk))
                return False
        except TimeoutError:
            ctx.body_error = ClientBodyError(408, "the request body was not received in time")
        except (aiohttp.ClientPayloadError, BodyError) as exc:
            ctx.body_error = ClientBodyError(400, f"malformed request body: {exc}")
        except ConnectionResetError:  # aiohttp's reader: the client went mid-body
            ctx.body_error = ClientBodyError(400, GONE)
        raise ctx.body_error

    async def _body_first(
        self, request: AnyRequest, snap: Snapshot, ctx: Ctx, limit: int | None = None
    ) -> tuple[list[bytes], bool]:
        """The body read before anything of the upstream is taken (bulkhead, pool): all
        of it up to ``limit`` (``buffer_body_bytes`` when None: True), else that much
        (False)."""
        lean = request.lean_body()
        whole = lean.take_whole() if lean is not None else None
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
            return held, await self._buffer(request, snap, ctx, held, limit)
        except ClientBodyError as body_err:
            raise Reject(body_err.status, str(body_err), event="bad_request") from None

    async def read_json(self, request: AnyRequest, snap: Snapshot, ctx: Ctx) -> Any:
        """The parsed JSON body a ``json:`` key is read from (SPEC 11), or ``NO_BODY``.

        Only a body with a JSON media type, declared (or chunked) at most ``MAX_BODY``
        bytes, is read; what was read is kept (``ctx.body_held``) and goes upstream as it
        came, followed by the rest of a larger body as it arrives. A larger or non-JSON
        body is not touched here: it streams as any other."""
        if not request.body_exists:
            return _NO_BODY
        clen = request.content_length
        if (clen is not None and clen > min(_MAX_BODY, snap.max_body_bytes)) or not (
            _is_json_media_type(request.headers.get(_CONTENT_TYPE))
        ):
            return _NO_BODY
        try:
            held, eof = await self._body_first(
                request, snap, ctx, max(snap.buffer_body_bytes, _MAX_BODY + 1)
            )
        except BaseException:
            if ctx.held:
                self.unhold(ctx)
            raise
        ctx.body_held, ctx.body_eof = held, eof
        if not eof or ctx.held > _MAX_BODY:  # larger than a key is read from: no join
            return _NO_BODY
        return _parse_body(held[0] if len(held) == 1 else b"".join(held))

    def release_body(self, ctx: Ctx) -> None:
        """Let go of a body read for a key when the request ends before its upstream leg."""
        ctx.body_held = None
        if ctx.held:
            self.unhold(ctx)

    def _failed(self, ctx: Ctx, up: UpstreamState, exc: UpstreamError, retry: bool) -> None:
        """A send that failed: count it; return when another attempt follows (``retry``:
        the method and the attempts left allow one; the error and the retry budget must
        too), else raise the :class:`Reject` it makes."""
        t1 = self._loop.time()
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
        count_error(self.rt, up, ctx, exc)
        if exc.kind == "timeout" and not exc.sent:
            # no pool connection came free in time: the upstream never saw it
            up.breaker.release(t1)
            raise Reject(504, f"upstream {up.name!r} did not answer in time") from None
        up.breaker.record(t1, failure=True)
        if not exc.sent and retry and up.budget.can_retry(t1):
            up.budget.record_retry(t1)
            return
        if exc.kind == "timeout":
            raise Reject(504, f"upstream {up.name!r} did not answer in time") from None
        if exc.kind == HEAD_TOO_LARGE:
            raise Reject(
                502, f"upstream {up.name!r} answered with a response head too large"
            ) from None
        raise Reject(502, f"upstream {up.name!r} is unreachable: {exc.kind} error") from None

    @staticmethod
    async def _admitted_after_wait(up: UpstreamState, route: CompiledRoute) -> bool:
        """In adaptive mode a request over the limit waits once, the upstream's no-load
        latency at most, and is checked again.  Refused at once, a closed-loop flood sends
        again at once: the refusals then take the gateway's CPU, its own delay inflates
        the latency the limit learns from, and the limit falls for a queue that is the
        gateway's, not the upstream's.  The wait paces such a client to one refusal a
        no-load latency, and a slot that frees meanwhile is taken."""
        wait = up.refusal_wait_s
        if not wait:
            return False
        await asyncio.sleep(wait)
        return up.admits(route.priority, reserved=route.reserved)

    async def forward(
        self,
        request: AnyRequest,
        snap: Snapshot,
        ctx: Ctx,
        up: UpstreamState,
        raw_path_qs: str,
        *,
        via_proxy: bool,
    ) -> Response:
        held: list[bytes] | None = ctx.body_held
        eof = ctx.body_eof
        if held is None and request.body_exists:
            # before the bulkhead: a client slow to send its body holds no upstream resource
            try:
                held, eof = await self._body_first(request, snap, ctx)
            except BaseException:
                if ctx.held:
                    self.unhold(ctx)
                raise
        route = ctx.route
        assert route is not None  # noqa: S101 - the leg runs for a matched route
        if not up.admits(route.priority, reserved=route.reserved) and not (
            await self._admitted_after_wait(up, route)
        ):
            if ctx.held:
                self.unhold(ctx)
            self.rt.metrics.shed_total.labels(route.name, route.priority_name).inc()
            raise bulkhead_full(up, "requests in flight")
        critical = route.priority is Priority.CRITICAL
        up.inflight += 1
        admitted_with = up.inflight
        if critical:
            up.critical_inflight += 1
        up.inflight_gauge.inc()
        try:
            up_fields = upstream_fields(request, snap, ctx, up, via_proxy=via_proxy)
            # the send, with breaker and bounded retries (here, not in a coroutine of its
            # own: one frame less to resume when the answer comes)
            loop = self._loop
            method = request.method
            retries = up.config.retries
            # a body read whole before sending can be sent again
            idempotent = method in _IDEMPOTENT and eof
            now = loop.time()
            up.budget.record_request(now)
            attempt = 0
            while True:
                if not up.breaker.acquire(now):
                    raise circuit_open(up, now)
                t0 = now
                sent: AsyncIterator[bytes] | list[bytes] | None = held
                if not eof:
                    assert held is not None  # noqa: S101 - a body was begun
                    sent = _stream_body(
                        self, request, snap, ctx, held, end=t0 + up.config.timeout_s
                    )
                try:
                    # (the pool's own call: UpstreamClient.send without its frame)
                    up_resp = await up.pool.request(
                        method,
                        raw_path_qs,
                        up_fields,
                        sent,
                        chunked=sent is not None and request.content_length is None,
                    )
                    break
                except asyncio.CancelledError:
                    up.breaker.release(loop.time())  # the client went away: no outcome
                    raise
                except ClientBodyError as body_err:
                    up.breaker.release(loop.time())  # the client's fault, not the upstream's
                    raise Reject(body_err.status, str(body_err), event="bad_request") from None
                except UpstreamError as exc:
                    attempt += 1
                    self._failed(ctx, up, exc, idempotent and attempt < retries.attempts)
                await asyncio.sleep(backoff_s(attempt - 1, retries, random.random()))
                now = loop.time()
            if held:  # sent: its bytes go now, not when the answer is over
                held.clear()
                self.unhold(ctx)
            try:
                now = self._loop.time()
                elapsed = now - t0
                up.duration.observe(elapsed)
                if up.gradient is not None:
                    # the loop's lag is the gateway's own share of elapsed (a busy
                    # loop reads the answer late), not a queue in the upstream
                    up.on_sample(elapsed, now, admitted_with, self._lag.last_s)
                status = up_resp.status
                up.breaker.record(now, failure=up.breaker.is_failure(status, elapsed))
                ctx.status = status
                if not ctx.exempt and (status == 404 or status in (401, 403)):
                    self.rt.bans.report(
                        ctx.ban_key,
                        "not_found" if status == 404 else "auth_failure",
                        Seen(request.method, ctx.path, status, ctx.rid),
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
                ctx.streamed = True
                written = 0
                try:
                    async for chunk in up_resp.iter_body():
                        await request.write(chunk)
                        written += len(chunk)
                    await request.write_eof()
                finally:  # (an answer cut short is recorded with what was written)
                    ctx.bytes_out = written
            except UpstreamError as exc:
                # the upstream failed mid-response: nothing sane can follow on this connection
                count_error(self.rt, up, ctx, exc)
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
            if critical:
                up.critical_inflight -= 1
            up.inflight_gauge.dec()
            if ctx.held:  # the send failed with the body still held
                self.unhold(ctx)
