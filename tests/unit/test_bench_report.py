"""bench/run.py's report: c=1 added latency is judged in the direct run's placement (one
CPU) and reported beside nginx's with two; the redis ratio is paired by round; the floor
is reported beside the pipeline, never judged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "bench" / "run.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


run: Any = _load_run()


def _wrk(p50_us: float, *, rps: float = 10_000.0, cpu_s: float = 0.5) -> Any:
    return run.WrkResult(
        requests=int(rps), seconds=1.0, rps=rps, p50_us=p50_us, p99_us=2 * p50_us, errors=0,
        cpu_s=cpu_s,
    )  # fmt: skip


def _target(key: str, two_cpus: float, one_cpu: float) -> Any:
    proc = run.Proc(name=key, popen=None, port=1, log=Path("/dev/null"), cpu=1)
    t = run.Target(key=key, what=key, proc=proc)
    t.saturated.append(_wrk(1000.0))
    t.single.append(_wrk(two_cpus))
    t.single_one_cpu.append(_wrk(one_cpu))
    return t


def _rows(lines: list[str]) -> dict[str, list[str]]:
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_one_cpu_placement_is_judged_and_two_cpus_reported() -> None:
    extra = run.Extra()
    extra.direct_c1.append(_wrk(10.0))
    targets = [
        _target("nginx", two_cpus=170.0, one_cpu=30.0),
        _target("gw-memory", two_cpus=280.0, one_cpu=110.0),
        _target("gw-redis", two_cpus=400.0, one_cpu=175.0),
    ]
    rows = _rows(run.checks(targets, extra, 10.0))

    two = rows["gw-memory c=1 added p50, two CPUs"]
    assert two[1].startswith("270.0 µs")
    assert "nginx: 160.0 µs" in two[1]
    assert "gateway - nginx 110.0 µs" in two[1]
    assert two[2] == "info"
    one = rows["gw-memory c=1 added p50, one CPU"]
    assert one[1].startswith("100.0 µs")
    assert "nginx: 20.0 µs" in one[1]
    assert one[0] == "<= 2x nginx's"
    assert one[2] == "FAIL"  # 5x nginx's 20 µs
    assert "5.00x" in one[1]
    # a round trip to Redis that nginx's limit_req does not make: reported, not judged
    red = rows["gw-redis c=1 added p50, one CPU"]
    assert red[0] == "reported"
    assert red[1].startswith("165.0 µs")
    assert red[2] == "info"


def test_the_floor_is_reported_beside_the_pipeline() -> None:
    extra = run.Extra()
    extra.direct_c1.append(_wrk(10.0))
    floor = _target("gw-floor", two_cpus=220.0, one_cpu=50.0)
    floor.saturated[:] = [_wrk(1000.0, cpu_s=0.25)]  # half the pipeline's CPU a request
    targets = [
        _target("nginx", two_cpus=170.0, one_cpu=30.0),
        _target("gw-memory", two_cpus=280.0, one_cpu=110.0),
        floor,
    ]
    rows = _rows(run.checks(targets, extra, 10.0))
    vs = rows["gw-memory vs gw-floor, req per CPU-s"]
    assert vs[1].startswith("0.500x")
    assert "gw-floor: 2.000x nginx" in vs[1]
    assert vs[2] == "info"
    one = rows["gw-floor c=1 added p50, one CPU"]
    assert one[0] == "reported"
    assert one[1].startswith("40.0 µs")
    assert "2.00x" in one[1]
    assert one[2] == "info"


def test_c1_added_p50_passes_within_twice_nginxs() -> None:
    extra = run.Extra()
    extra.direct_c1.append(_wrk(10.0))
    targets = [
        _target("nginx", two_cpus=170.0, one_cpu=30.0),
        _target("gw-memory", two_cpus=280.0, one_cpu=50.0),
    ]
    rows = _rows(run.checks(targets, extra, 10.0))
    assert rows["gw-memory c=1 added p50, one CPU"][2] == "PASS"  # 40 µs, nginx 20 µs


def test_the_table_shows_both_placements() -> None:
    targets = [_target("gw-memory", two_cpus=280.0, one_cpu=110.0)]
    lines = run.table(targets, 10.0)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, [c.strip() for c in lines[3].strip("|").split("|")], strict=True))
    assert row["c=1 p50 µs"] == "280.0"
    assert row["c=1 added p50 µs, two CPUs"] == "270.0"
    assert row["c=1 added p50 µs, one CPU"] == "100.0"


def test_the_redis_ratio_is_the_median_of_per_round_pairs() -> None:
    """Ratios within each round (0.9x, 0.97x, 0.8x): their median is 0.9x, while the
    ratio of the two medians (12,000 against 15,000 req/s) would mix rounds: 0.8x."""
    mem = _target("gw-memory", two_cpus=200.0, one_cpu=100.0)
    red = _target("gw-redis", two_cpus=300.0, one_cpu=140.0)
    mem.saturated[:] = [_wrk(1000.0, rps=r) for r in (10_000.0, 20_000.0, 15_000.0)]
    red.saturated[:] = [_wrk(1000.0, rps=r) for r in (9_000.0, 19_400.0, 12_000.0)]
    assert run.paired_ratio(red, mem) == 0.9
    extra = run.Extra()
    extra.direct_c1.append(_wrk(10.0))
    row = _rows(run.checks([mem, red], extra, 10.0))["gw-redis vs gw-memory, req/s"]
    assert row[1].startswith("0.900x")
    assert "ratio of the medians 0.800x" in row[1]
    assert row[2] == "PASS"
