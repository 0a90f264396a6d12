"""bench/inprocess.py keeps working as the server, pipeline and pool change."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
