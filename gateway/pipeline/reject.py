"""Refusals: :class:`Reject`, the one way a step stops a request, and its problem+json answer.

A step that refuses raises :class:`Reject`; the handler turns it into one answer
(:func:`problem_answer`) and records what was decided. The refusals more than one step
makes (a full bulkhead, an open circuit, a ban, an exhausted quota) are built here, so
the handler and ``/admin/explain`` say the same words.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs

from gateway import problem
from gateway.downstream.messages import Response

if TYPE_CHECKING:
    from gateway.core.gcra import Decision
    from gateway.pipeline.snapshot import CompiledPolicy, Snapshot
    from gateway.upstream.state import UpstreamState


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


def quota_reject(
    violated: list[tuple[CompiledPolicy, Decision]], retry: float, now: float
) -> Reject:
    """The 429 of the enforced policies that have no budget left; ``now``: the UTC time
    of the decision (a monthly quota's ``w=``)."""
    names = [p.name for p, _ in violated]
    return Reject(
        429,
        f"rate limit exceeded: {', '.join(names)}",
        type_=problem.QUOTA_EXCEEDED,
        headers={
            "Retry-After": str(max(1, math.ceil(retry))),
            "RateLimit-Policy": ", ".join(p.header_item(now) for p, _ in violated),
            "RateLimit": ", ".join(
                f'"{p.name}";r=0;t={max(1, math.ceil(d.reset_s))}' for p, d in violated
            ),
        },
        extra={"violated_policies": names},
        event="rate_limited",
    )


def banned(snap: Snapshot, expires_at: float) -> Reject:
    """The answer to a banned client (``abuse.ban_status``)."""
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


def too_many_in_flight(policy: str) -> Reject:
    """A concurrency policy's refusal (SPEC section 10): 429, no RateLimit fields."""
    return Reject(
        429,
        f"too many requests in flight: {policy}",
        type_=problem.QUOTA_EXCEEDED,
        headers={"Retry-After": "1"},
        extra={"violated_policies": [policy]},
        event="rate_limited",
    )


def bulkhead_full(up: UpstreamState, what: str) -> Reject:
    return Reject(
        503,
        f"upstream {up.name!r} has too many {what}",
        type_=problem.problem_type("bulkhead-full"),
        headers={"Retry-After": "1"},
        kind="bulkhead_full",
    )


def buffers_full() -> Reject:
    return Reject(
        503,
        "too many request bodies are being received: try again",
        type_=problem.problem_type("body-buffers-full"),
        headers={"Retry-After": "1"},
    )


def circuit_open(up: UpstreamState, now: float) -> Reject:
    return Reject(
        503,
        f"upstream {up.name!r} is failing: circuit open",
        type_=problem.problem_type("circuit-open"),
        headers={"Retry-After": str(max(1, math.ceil(up.breaker.retry_after(now))))},
        kind="circuit_open",
    )


def problem_answer(rej: Reject, rid: str, *, close: bool) -> Response:
    """The problem+json answer of a refusal; ``close``: the connection ends after it."""
    # a plain answer (the upgrade protocol's server converts it when it serves one)
    body = problem.problem_body(
        rej.status, rej.detail, request_id=rid, type_=rej.type_, extra=rej.extra
    )
    fields = [*rej.headers.items()] if rej.headers else []
    fields.append((hdrs.CONTENT_TYPE, problem.CONTENT_TYPE))
    resp = Response(rej.status, None, fields, body)
    if close or rej.status in (400, 408, 413, 431):
        resp.force_close()
    return resp
