"""The access log line: one JSON object with the request's facts, flushed in batches."""

from __future__ import annotations

import io
import re

import orjson

from gateway.logs import AccessLog


def test_access_line_is_one_json_object_with_iso_timestamp() -> None:
    buf = io.BytesIO()
    log = AccessLog(buf)
    log.emit({"request_id": "r1", "client_ip": "203.0.113.7", "status": 200, "path": "/a"})
    log.emit({"request_id": "r2", "client_ip": "203.0.113.8", "status": 404, "path": "/b"})
    assert buf.getvalue() == b""  # buffered until a flush
    log.flush()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    first = orjson.loads(lines[0])
    assert first["event"] == "access"
    assert first["level"] == "info"
    assert first["request_id"] == "r1"
    assert first["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["ts"])
    assert orjson.loads(lines[1])["path"] == "/b"


def test_close_flushes_and_a_full_buffer_is_written() -> None:
    buf = io.BytesIO()
    log = AccessLog(buf)
    log.emit({"x": 1})
    log.close()
    assert buf.getvalue().count(b"\n") == 1
    for i in range(2000):
        log.emit({"i": i, "pad": "p" * 50})
    assert buf.getvalue().count(b"\n") > 500  # written out past 64 KiB, no flush needed


def test_event_budget_caps_lines_and_reports_what_it_dropped() -> None:
    from gateway.logs import EventBudget

    b = EventBudget(rate=5)
    got = [b.take(100.0) for _ in range(8)]
    assert got[:5] == [0, 0, 0, 0, 0]
    assert got[5:] == [None, None, None]
    assert b.take(100.1) is None  # half a token refilled
    assert b.take(100.3) == 4  # one token: the line passes and says 4 were dropped
    assert b.take(100.3) is None


def test_milliseconds_is_round_to_three_places_of_the_product() -> None:
    import math
    import random

    from gateway.logs import milliseconds

    rng = random.Random(11)
    values = [rng.uniform(0, 2.0) for _ in range(20000)]
    values += [rng.expovariate(100.0) for _ in range(20000)]
    values += [(k + 0.5) / 1e6 for k in range(2000)]  # ties (as near as a float gets)
    values += [k / 1e6 for k in range(2000)]
    values += [math.nextafter((k + 0.5) / 1e6, d) for k in range(500) for d in (0, 1)]
    values += [0.0, -0.0, -0.001, 1e6, 999.9999995, 1e300, math.inf, -math.inf, 5e-324]
    for v in values:
        want = round(v * 1000, 3)
        got = milliseconds(v)
        assert repr(got) == repr(want), (v, got, want)
    assert math.isnan(milliseconds(math.nan))


_REQUEST_KEYS = [
    "request_id",
    "client_ip",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "bytes",
    "upstream",
    "trace_id",
]


def _request_line(log: AccessLog, buf: io.BytesIO, identity: str | None, now: float) -> bytes:
    log.request(
        request_id="r1",
        client_ip="203.0.113.7",
        method="GET",
        path='/a"\u00e9',
        route="default",
        status=200,
        duration_ms=1.25,
        size=512,
        upstream=None,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        identity=identity,
        now=now,
    )
    log.flush()
    out = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return out


def test_request_line_is_the_emitted_line_of_the_same_fields() -> None:
    buf = io.BytesIO()
    log = AccessLog(buf)
    now = 1_767_225_600.25
    for identity in (None, "jwt:alice"):
        line = _request_line(log, buf, identity, now)
        assert line.endswith(b"}\n")
        assert line.count(b"\n") == 1
        fields = orjson.loads(line)
        keys = _REQUEST_KEYS + (["identity"] if identity else []) + ["event", "level", "ts"]
        assert list(fields) == keys
        assert fields["ts"] == "2026-01-01T00:00:00.250000Z"
        expected = {k: fields[k] for k in keys[:-3]}
        log.emit(expected)
        log.flush()
        emitted = orjson.loads(buf.getvalue())
        buf.seek(0)
        buf.truncate()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", emitted.pop("ts"))
        fields.pop("ts")
        assert list(emitted.items()) == list(fields.items())
        assert line.index(b'"path":"/a\\"\xc3\xa9"') > 0  # escaped and UTF-8, as before


def test_timestamps_truncate_to_the_microsecond_as_the_percent_format_did() -> None:
    import random
    import time

    buf = io.BytesIO()
    log = AccessLog(buf)
    rng = random.Random(5)
    instants = [1_767_225_600 + rng.random() * 100_000 for _ in range(3000)]
    instants += [1_767_225_600.0, 1_767_225_600.999999, 1_767_225_601.0000001]
    for now in sorted(instants):
        sec = int(now)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        want = "%s.%06dZ" % (stamp, (now - sec) * 1e6)  # noqa: UP031 - the old format
        assert orjson.loads(_request_line(log, buf, None, now))["ts"] == want


def _orjson_line(log: AccessLog, now: float, fields: dict[str, object]) -> bytes:
    """The line as orjson writes it from the fields in the access log's order."""
    identity = fields.pop("identity")
    line = {**fields, **({"identity": identity} if identity is not None else {})}
    line.update(event="access", level="info", ts=log._ts(now))
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


_PIECES = [
    "/", "/api/items", "a", "Z9", "-", "_", ".", "~", "%2F", " ", "'", "\x7f", '"', "\\",
    "\n", "\t", "\x00", "\x1f", "\u00e9", "\u2028", "\U0001f600", "{", "}", ":", ",", "/*",
]  # fmt: skip


def test_every_request_line_is_the_bytes_orjson_makes_of_its_fields() -> None:
    """The template (most lines) and orjson (the rest) write the same bytes for the same
    fields: quotes, backslashes, controls, non-ASCII text and odd durations included."""
    import random

    rng = random.Random(11)
    buf = io.BytesIO()
    log = AccessLog(buf)

    def text() -> str:
        return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 6)))

    durations = [0.0, 0.001, 1.25, 12.0, 999.999, 1e15, 1e16, 123456789.123]
    durations += [1e-05, 5e-324, 0.0001, -1.0, -0.0, float("inf"), float("nan")]
    for i in range(4000):
        fields: dict[str, object] = {
            "request_id": rng.choice(["r1", "00ab12cd34ef5678", "a.b_c-D"]),
            "client_ip": rng.choice(["203.0.113.7", "2001:db8::1", "-", text()]),
            "method": rng.choice(["GET", "POST", "OTHER", text()]),
            "path": text() if i % 2 else "/api/" + text(),
            "route": rng.choice(["api", "none", text()]),
            "status": rng.choice([200, 404, 499, 503]),
            "duration_ms": rng.choice(durations) if i % 3 else round(rng.random() * 5000, 3),
            "bytes": rng.choice([0, 200, 10**12]),
            "upstream": rng.choice([None, "api", text()]),
            "trace_id": rng.choice([None, "0af7651916cd43dd8448eb211c80319c"]),
            "identity": rng.choice([None, "jwt:alice", "api_key:k1", "jwt:" + text()]),
        }
        now = 1_767_225_600 + rng.random() * 1000
        want = _orjson_line(log, now, dict(fields))
        log.request(
            request_id=str(fields["request_id"]),
            client_ip=str(fields["client_ip"]),
            method=str(fields["method"]),
            path=str(fields["path"]),
            route=str(fields["route"]),
            status=int(fields["status"]),  # type: ignore[call-overload]
            duration_ms=float(fields["duration_ms"]),  # type: ignore[arg-type]
            size=int(fields["bytes"]),  # type: ignore[call-overload]
            upstream=fields["upstream"],  # type: ignore[arg-type]
            trace_id=fields["trace_id"],  # type: ignore[arg-type]
            identity=fields["identity"],  # type: ignore[arg-type]
            now=now,
        )
        log.flush()
        assert buf.getvalue() == want, fields
        buf.seek(0)
        buf.truncate()
