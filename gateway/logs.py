"""Structured logs: one JSON object a line on stdout (structlog + orjson)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any, Final

import orjson
import structlog

# Module-level finals: compiled, each is a C static rather than a module attribute's
# lookup per line (the option an object, not an int boxed anew at each call).
_serialise: Final = orjson.dumps
_time: Final = time.time
_LINE_OPTION: Final[Any] = orjson.OPT_APPEND_NEWLINE
_DIGITS: Final = tuple(f"{n:03d}" for n in range(1000))
"""``"000"`` to ``"999"``: a timestamp's microseconds as two table lookups, not a format."""


def _dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default or str)


def milliseconds(seconds: float) -> float:
    """``round(seconds * 1000, 3)``, the same float, mostly without ``round``'s decimal
    conversion (a string made and parsed back): the access log's ``duration_ms``.

    ``us`` is within half a unit in the last place (under 1e-7 below 1e9) of the exact
    product, so unless its fraction is near one half the rounding goes the same way as
    for the exact value, and ``n / 1000`` is the float nearest ``n`` thousandths, as
    ``round`` returns. Near a half, outside (0, 1e9) or NaN: ``round`` itself.
    """
    ms = seconds * 1000.0
    us = ms * 1000.0
    if 0.0 < us < 1e9:
        whole = float(int(us))
        frac = us - whole
        if frac < 0.499999:
            return whole / 1000.0
        if frac > 0.500001:
            return (whole + 1.0) / 1000.0
    return round(ms, 3)


_BUFFER_LIMIT: Final = 65536  # bytes of access lines held before they are written
_LINE_HEAD: Final = '{"request_id":"'
_LINE_TAIL: Final = '"}\n'


def _plain(text: str) -> bool:
    """True when ``text`` is its own JSON string body: orjson writes it as it is. Only
    ASCII text is taken (``isascii`` is a flag read, not a scan); any other goes to
    orjson, which writes non-ASCII as UTF-8 and escapes what needs it."""
    # (isascii reads a flag; isprintable on ASCII excludes the controls and DEL)
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def configure(level: int = logging.INFO) -> None:
    """Configure structlog once, for the whole process (JSON lines on stdout)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library: route their warnings to
    # stderr as plain lines so stdout stays one JSON object a line.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str = "gateway") -> Any:
    return structlog.get_logger(name)


class AccessLog:
    """The per-request ``access`` event, written without structlog's per-call chain.

    Same JSON shape as every other event, but serialised in one ``orjson.dumps`` call,
    with the timestamp's text made once per second, and buffered here (stdout may be
    unbuffered, as with ``PYTHONUNBUFFERED=1``): written out every ``flush_s``, when the
    buffer passes 64 KiB, and at close. One request must not cost one write syscall;
    access lines may reach stdout up to ``flush_s`` after other events.
    """

    __slots__ = ("_flush_s", "_handle", "_lines", "_sec", "_size", "_stamp", "_stream")

    def __init__(self, stream: Any = None, *, flush_s: float = 0.5) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        # the lines written since the last flush, joined once then (an append a line,
        # not a copy into a growing buffer)
        self._lines: list[bytes] = []
        self._size = 0
        self._flush_s = flush_s
        self._handle: asyncio.TimerHandle | None = None
        self._sec = -1
        self._stamp = ""

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._flush_s, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._handle = asyncio.get_running_loop().call_later(self._flush_s, self._tick)

    def flush(self) -> None:
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines = []
        self._size = 0
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(data)
            self._stream.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.flush()

    def _ts(self, now: float) -> str:
        """``now`` as ``2026-01-02T03:04:05.123456Z`` (UTC, microseconds truncated)."""
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        micro = int((now - sec) * 1e6)
        if 0 <= micro < 1000000:
            return f"{self._stamp}{_DIGITS[micro // 1000]}{_DIGITS[micro % 1000]}Z"
        return "%s%06dZ" % (self._stamp, micro)  # noqa: UP031 - before 1970 only

    def _write(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line)
        if self._size > _BUFFER_LIMIT:
            self.flush()

    def emit(self, fields: dict[str, Any]) -> None:
        """``fields`` as an ``access`` event (``event``, ``level`` and ``ts`` added)."""
        fields["event"] = "access"
        fields["level"] = "info"
        fields["ts"] = self._ts(_time())
        self._write(_serialise(fields, default=str, option=_LINE_OPTION))

    def request(
        self,
        *,
        request_id: str,
        client_ip: str,
        method: str,
        path: str,
        route: str,
        status: int,
        duration_ms: float,
        size: int,
        upstream: str | None,
        trace_id: str | None,
        identity: str | None,
        now: float,
    ) -> None:
        """One request's line, as :meth:`emit` writes it for the same fields in this
        order, ``identity`` left out when None; ``now`` is the request's end (unix
        time).

        Most lines are written from a template: when every text field is its own JSON
        string body (ASCII, no control, quote or backslash) and the duration prints
        alike in Python and orjson, the line is the same bytes orjson would make (a test
        holds the two equal). Any other line is serialised by orjson from a dict made
        at once with every key (no growth, no second pass).
        """
        ts = self._ts(now)
        # the request id (its pattern) and the trace id (hex) are plain by construction;
        # the other text fields are checked in one pass. From 1e-4 to 1e15, repr() and
        # orjson print a float alike.
        if (1e-4 <= duration_ms < 1e15 or duration_ms == 0.0) and _plain(
            f"{client_ip}{method}{path}{route}{upstream or ''}{identity or ''}"
        ):
            # (str pieces only, and no literal brace: compiled, one string built at once;
            # str() and repr() rather than conversion flags, which compile to format calls.
            # A field that may be null is its quote, its text and its quote again: pieces
            # of the one string, none built on its own)
            uq, up = ("", "null") if upstream is None else ('"', upstream)
            tq, trace = ("", "null") if trace_id is None else ('"', trace_id)
            wq, who, wc = ("", "", "") if identity is None else (',"identity":"', identity, '"')
            self._write(
                f'{_LINE_HEAD}{request_id}","client_ip":"{client_ip}",'
                f'"method":"{method}","path":"{path}","route":"{route}",'
                f'"status":{str(status)},"duration_ms":{repr(duration_ms)},'  # noqa: RUF010
                f'"bytes":{str(size)},"upstream":{uq}{up}{uq},"trace_id":{tq}{trace}{tq}'  # noqa: RUF010
                f'{wq}{who}{wc},"event":"access","level":"info","ts":"{ts}{_LINE_TAIL}'.encode()
            )
            return
        if identity is None:
            line = {
                "request_id": request_id,
                "client_ip": client_ip,
                "method": method,
                "path": path,
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
                "bytes": size,
                "upstream": upstream,
                "trace_id": trace_id,
                "event": "access",
                "level": "info",
                "ts": ts,
            }
        else:
            line = {
                "request_id": request_id,
                "client_ip": client_ip,
                "method": method,
                "path": path,
                "route": route,
                "status": status,
                "duration_ms": duration_ms,
                "bytes": size,
                "upstream": upstream,
                "trace_id": trace_id,
                "identity": identity,
                "event": "access",
                "level": "info",
                "ts": ts,
            }
        self._write(_serialise(line, default=str, option=_LINE_OPTION))


class EventBudget:
    """At most ``rate`` lines a second (bursts of ``rate``) for one noisy event.

    Under attack every refused request would log a line; past the budget lines are
    dropped and counted, and the next line that passes says how many were dropped.
    """

    __slots__ = ("_last", "_rate", "_tokens", "rate", "suppressed")

    def __init__(self, rate: float = 50.0) -> None:
        self.rate = rate
        self._rate = rate
        self._tokens = rate
        self._last = 0.0
        self.suppressed = 0

    def take(self, now: float) -> int | None:
        """None: drop this line. Else the number of lines dropped since the last one."""
        self._tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return None
        self._tokens -= 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped
