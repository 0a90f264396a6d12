"""bench/overload.py runs: the scenario, in small numbers and a few seconds (timings are
not judged here; a shared machine makes them noise at this size)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed"),
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs"),
]


def test_the_overload_scenario_runs_and_reports_every_config() -> None:
    argv = [
        sys.executable,
        str(ROOT / "bench" / "overload.py"),
        "--duration=1",
        "--alone=1",
        "--settle=1",
        "--connections=16",
        "--capacity-s=1",
        "--no-double",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=110, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for what in ("defaults (max_inflight 500", "hand-tuned bulkhead", "adaptive + priorities"):
        assert f"| {what}" in out
    assert "critical success" in out
    rows = [line for line in out.splitlines() if line.startswith("| adaptive")]
    assert rows
    assert "- adaptive, 8 at once: critical success" in out  # the goals were judged
