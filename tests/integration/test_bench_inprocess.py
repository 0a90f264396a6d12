"""bench/inprocess.py keeps working as the server, pipeline and pool change."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_inprocess_bench_runs_both_handlers() -> None:
    argv = [sys.executable, str(ROOT / "bench" / "inprocess.py")]
    argv += ["--samples", "2", "--batches", "5", "--connections", "5"]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    rows = dict(re.findall(r"^\| (pipeline|floor) \| ([\d.]+) \|", out, re.MULTILINE))
    assert set(rows) == {"pipeline", "floor"}, out
    # the pipeline does all the floor does and more
    assert float(rows["pipeline"]) > float(rows["floor"]) > 0, out
    assert "pipeline / floor (min):" in out
    assert '"event":"access"' not in out  # the access log stays off the report


def test_inprocess_bench_compares_tracing_and_the_route_figures() -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="the extra gateway[otel] is missing")
    argv = [sys.executable, str(ROOT / "bench" / "inprocess.py"), "--observability"]
    argv += ["--samples", "2", "--batches", "5", "--connections", "5"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = dict(re.findall(r"^\| ([a-z0-9-]+) \| ([\d.]+) \|", out, re.MULTILINE))
    assert set(rows) == {
        "pipeline",
        "no-tracing",
        "trace-0",
        "trace-1",
        "trace-1-export",
        "no-window-stats",
        "floor",
    }, out
    assert "against pipeline (min):" in out
    # building, encoding and sending a span per request costs more than not exporting
    assert float(rows["trace-1-export"]) > float(rows["trace-1"]), out
