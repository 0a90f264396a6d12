"""bench/identity.py keeps working as the identity path changes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_identity_bench_runs_every_row() -> None:
    argv = [sys.executable, str(ROOT / "bench" / "identity.py")]
    argv += ["--samples", "2", "--batches", "3", "--connections", "4"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = dict(re.findall(r"^\| ([a-z ,]+) \| ([\d.]+) \|", out, re.MULTILINE))
    assert set(rows) == {
        "ip",
        "ip, token sent",
        "jwt, same token",
        "jwt, fresh token",
        "forged, budget",
        "forged, no budget",
    }, out
    assert "same valid token over the IP-keyed route:" in out
    # the budget stopped the checks: 20 forged tokens checked (and one each 3 s of refill)
    checked = re.search(r"\(budget 20\): valid \d+, bad_signature (\d+), throttled \d+", out)
    assert checked is not None, out
    assert 20 <= int(checked.group(1)) <= 25, out
    assert re.search(r"\(no budget\): valid \d+, bad_signature \d+, throttled 0", out), out
    assert '"event":"access"' not in out
