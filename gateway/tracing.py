"""Spans of sampled requests sent to an OTLP/HTTP collector (``tracing.otlp_endpoint``).

The OpenTelemetry SDK is an optional extra (``gateway[otel]``) and is imported only when
an endpoint is configured. The request path builds one finished span record and hands it
to the SDK's ``BatchSpanProcessor``, which queues it (bounded: past its queue, spans are
dropped) and batches, encodes and sends them on its own thread. No span object lives
while the request runs, and no context is attached to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.logs import EventBudget

if TYPE_CHECKING:
    from gateway.core.tracecontext import TraceContext

__all__ = ["SpanExport", "otel_missing"]

_SDK_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


def otel_missing() -> str | None:
    """Why the OTLP export cannot run here (the extra is not installed), else None."""
    import importlib  # noqa: PLC0415 - only when an endpoint is configured

    for name in _SDK_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"cannot import {name} ({exc})"
    return None


class _EveryMinute(logging.Filter):
    """One line a minute per message of the SDK's own logs: a collector that is down, or
    a queue that overflows, would otherwise log a line for each batch or each span."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)[:80]
        now = time.monotonic()
        if now - self._last.get(key, -60.0) < 60.0:
            return False
        if len(self._last) > 100:
            self._last.clear()
        self._last[key] = now
        return True


_QUIET = _EveryMinute()


def _quieten_sdk_logs() -> None:
    """The filter on each of the SDK's loggers (a logger's filters see only its own
    records, not its children's); they exist once the SDK's modules are imported."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (
            name.startswith("opentelemetry")
            and isinstance(logger, logging.Logger)
            and _QUIET not in logger.filters
        ):
            logger.addFilter(_QUIET)


class SpanExport:
    """One OTLP span per sampled request, batched and sent off the request path."""

    __slots__ = (
        "_budget",
        "_error",
        "_flags",
        "_kind",
        "_ok",
        "_processor",
        "_readable",
        "_resource",
        "_scope",
        "_span_context",
    )

    def __init__(
        self,
        endpoint: str,
        *,
        max_per_s: float = 1000.0,
        schedule_delay_s: float | None = None,
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import ReadableSpan  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: PLC0415
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags  # noqa: PLC0415
        from opentelemetry.trace.status import Status, StatusCode  # noqa: PLC0415

        _quieten_sdk_logs()
        self._budget = EventBudget(max_per_s)
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured; the name defaults
        # to the gateway's own (the SDK's default would be "unknown_service")
        service = os.environ.get("OTEL_SERVICE_NAME") or "gateway"
        self._resource = Resource.create({"service.name": service})
        self._scope = InstrumentationScope("gateway", __version__)
        self._readable = ReadableSpan
        self._span_context = SpanContext
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._kind = SpanKind.SERVER
        self._ok = Status(StatusCode.UNSET)
        self._error = Status(StatusCode.ERROR)
        delay = None if schedule_delay_s is None else schedule_delay_s * 1000
        self._processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=delay
        )

    def export(
        self,
        trace: TraceContext,
        method: str,
        route: str,
        status: int,
        upstream: str | None,
        *,
        duration_s: float,
    ) -> None:
        """Hand the finished span of one sampled request over (a queue append); past
        the budget of spans a second it is not exported (its trace still goes upstream)."""
        if self._budget.take(time.monotonic()) is None:
            return
        end = time.time_ns()
        trace_id = int(trace.trace_id, 16)
        context = self._span_context(
            trace_id, int(trace.span_id, 16), is_remote=False, trace_flags=self._flags
        )
        parent = None
        if trace.parent_id is not None:
            parent = self._span_context(
                trace_id, int(trace.parent_id, 16), is_remote=True, trace_flags=self._flags
            )
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "http.response.status_code": status,
            "gateway.route": route,
        }
        if upstream is not None:
            attributes["gateway.upstream"] = upstream
        self._processor.on_end(
            self._readable(
                name=route,
                context=context,
                parent=parent,
                resource=self._resource,
                attributes=attributes,
                kind=self._kind,
                status=self._error if status >= 500 else self._ok,
                start_time=end - int(duration_s * 1e9),
                end_time=end,
                instrumentation_scope=self._scope,
            )
        )

    def set_rate(self, max_per_s: float) -> None:
        """A reload's ``tracing.max_spans_per_s``."""
        if max_per_s != self._budget.rate:
            self._budget = EventBudget(max_per_s)

    @property
    def dropped(self) -> int:
        """Sampled spans not exported since the last one was, for being over the budget."""
        return self._budget.suppressed

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued and stop the thread; blocks (up to the exporter's own
        timeout and retries when the collector is down: see :meth:`aclose`)."""
        self._processor.force_flush(int(timeout_s * 1000))
        self._processor.shutdown()  # type: ignore[no-untyped-call]

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """:meth:`close` on a daemon thread, waited for up to ``timeout_s``: a collector
        that is down must not hold the gateway's exit (the SDK's exporter retries for
        seconds), and what it still holds then is lost with the process."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            try:
                self.close(timeout_s)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone
                    loop.call_soon_threadsafe(finished)

        threading.Thread(target=run, name="otlp-close", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout_s)
