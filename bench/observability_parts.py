"""Instructions per call of the per-request work the observability features add, counted
by valgrind (callgrind) so that the machine's load does not move them.

    bench/observability_parts.py            # prints a markdown table; about a minute

Each part runs ``N`` times in a process of its own; a run of 0 is subtracted, then the
count is divided by ``N``. The parts are the code the pipeline runs for them, called as
the pipeline calls it (``bench/inprocess.py --observability`` measures the whole request).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N = 50_000
VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

PARTS = {
    "loop": "pass",
    "trace context, no traceparent (ratio 0.01)": (
        "c = start(h.getall('traceparent', None), None, 0.01)"
    ),
    "trace context, a valid traceparent and tracestate": (
        "c = start(t.getall('traceparent', None), t.getall('tracestate', None), 0.01)"
    ),
    "traceparent field sent upstream": "f'traceparent: {c.traceparent}\\r\\n'",
    "trace_id in the access log line": "dumps({**line, 'trace_id': c.trace_id})",
    "access log line without it (reference)": "dumps({**line})",
    "route figures: RouteSeries.record": "series.record(now(), 200, 0.0004)",
}

SETUP = f"""
import time
from multidict import CIMultiDict
from orjson import dumps
from gateway.core.tracecontext import start_or_continue as start
from gateway.core.window_stats import RouteSeries
h = CIMultiDict([("Host", "127.0.0.1:18000"), ("User-Agent", "bench")])
t = CIMultiDict([("Host", "x"), ("traceparent", "{VALID}"), ("tracestate", "rojo=1")])
c = start(None, None, 0.01)
line = {{"request_id": "0123456789abcdef0000000000000001", "client_ip": "127.0.0.1",
        "method": "GET", "path": "/api/items", "route": "api", "status": 200,
        "duration_ms": 0.412, "bytes": 200, "upstream": "api"}}
series = RouteSeries()
now = time.time
"""


def count(stmt: str, n: int) -> int:
    code = SETUP + f"\nfor _ in range({n}):\n    {stmt}\n"
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stderr
    return int(re.findall(r"Collected : (\d+)", out)[-1])


def main() -> None:
    t0 = time.monotonic()
    base = count("pass", 0)
    loop = (count("pass", N) - base) / N
    print("| part | instructions / call |")
    print("|---|--:|")
    for name, stmt in PARTS.items():
        if name == "loop":
            continue
        per = (count(stmt, N) - base) / N - loop
        print(f"| {name} | {per:,.0f} |")
    print(f"\n(loop overhead {loop:,.0f} subtracted; {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
