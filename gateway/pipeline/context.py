"""What one request gathers along the pipeline, for its later steps, its log line and metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.core.client_ip import IPAddress
    from gateway.core.tracecontext import TraceContext
    from gateway.pipeline.snapshot import CompiledRoute, Snapshot


class ClientBodyError(Exception):
    """The client's body failed (too large, too slow, malformed): its status and why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Ctx:
    """Per-request facts gathered along the pipeline (for the log line and metrics)."""

    __slots__ = (
        "ban_key",
        "body_eof",
        "body_error",
        "body_held",
        "body_open",
        "bytes_out",
        "client",
        "client_ip",
        "exempt",
        "held",
        "identity",
        "path",
        "rid",
        "route",
        "snap",
        "start",
        "status",
        "streamed",
        "trace",
        "underscores",
        "upstream",
        "xff",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.snap: Snapshot | None = None  # the request's config, kept for its record
        self.xff: str | None = None
        self.rid = ""
        self.client: IPAddress | None = None
        self.client_ip = ""
        self.ban_key = ""  # the client's key for scores, bans and limits (IPv6: its prefix)
        self.exempt = False
        self.route: CompiledRoute | None = None
        self.path: str | None = None  # the canonical path, once read (ban evidence)
        self.upstream: str | None = None
        self.status = 0
        self.bytes_out = 0
        self.streamed = False  # the answer's head went out before its body was all here
        self.body_error: ClientBodyError | None = None
        self.underscores: str | None = None  # how fields named with "_" go upstream
        self.identity: str | None = None  # jwt:<sub> or api_key:<id>, for the access log
        self.held = 0  # body bytes read and kept before the upstream exchange
        self.body_open = False  # a streamed body still has bytes to come from the client
        # a body read before the rate limits (a JSON key): its start, and whether it is all
        self.body_held: list[bytes] | None = None
        self.body_eof = True
        self.trace: TraceContext | None = None  # W3C trace context, sent upstream
