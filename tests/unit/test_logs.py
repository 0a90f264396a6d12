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
