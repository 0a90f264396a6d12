"""Ban evidence: the records, and the memory store keeping the last ten per client."""

from __future__ import annotations

from typing import Any

from gateway.config import Abuse
from gateway.core.evidence import (
    MAX_EVIDENCE,
    MAX_PATH_CHARS,
    Evidence,
    Seen,
    clip_path,
    decode_many,
)
from gateway.metrics import Metrics
from gateway.stores.memory.bans import MemoryBanStore

T0 = 1_700_000_000.0
IP = "203.0.113.9"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(**kw: Any) -> tuple[MemoryBanStore, Clock]:
    clock = Clock()
    return MemoryBanStore(Abuse(), metrics=Metrics(), clock=clock, **kw), clock


def test_a_record_round_trips_as_one_json_line() -> None:
    e = Evidence.of(T0, "not_found", Seen("GET", "/a b\n/c", 404, "rid-1"))
    line = e.encode()
    assert "\n" not in line
    assert Evidence.decode(line) == e
    assert e.as_dict() == {
        "at": T0,
        "reason": "not_found",
        "method": "GET",
        "path": "/a b\n/c",
        "status": 404,
        "request_id": "rid-1",
    }


def test_long_paths_are_clipped_and_garbage_lines_skipped() -> None:
    long = "/" + "x" * 5000
    clipped = clip_path(long)
    assert clipped is not None
    assert len(clipped) == MAX_PATH_CHARS
    assert clipped.endswith("...")
    assert Evidence.of(T0, "not_found", Seen(path=long)).path == clipped
    good = Evidence.of(T0, "bad_request", Seen(status=400)).encode()
    assert decode_many(f"not json\n{good}\n{{}}\n") == [Evidence.decode(good)]
    assert decode_many("") == []
    assert decode_many(None) == []


def test_a_ban_keeps_the_last_ten_scored_events() -> None:
    store, clock = make()
    for i in range(30):  # 1 point each: no ban yet
        clock.now += 0.5
        store.report(IP, "not_found", Seen("GET", f"/p{i}", 404, f"r{i}"))
    assert store.banned(IP) is None
    clock.now += 0.5
    store.report(IP, "suspicious_path", Seen("GET", "/.env", None, "r-env"))  # 30.x + 25
    ban = store.banned(IP)
    assert ban is not None
    assert ban.reason == "suspicious_path"
    assert store.evidence_of(IP) is not None
    records = store.evidence_of(IP) or []
    assert len(records) == MAX_EVIDENCE
    assert [r.path for r in records] == [f"/p{i}" for i in range(21, 30)] + ["/.env"]
    assert records[-1] == Evidence(clock.now, "suspicious_path", "GET", "/.env", None, "r-env")
    assert records[0].status == 404
    assert records[0].at < records[-1].at


async def test_listed_only_for_a_ban_in_force_and_refused_requests_add_nothing() -> None:
    store, clock = make()
    store.report(IP, "suspicious_path", Seen("GET", "/.git/config", 404, "a"))
    assert await store.evidence([IP]) == {}  # scored, not banned
    store.report(IP, "suspicious_path", Seen("GET", "/.env", 403, "b"))
    assert store.banned(IP) is not None
    # reports that reach a banned client (an answer already on its way) are not scored
    store.report(IP, "not_found", Seen("GET", "/late", 404, "c"))
    found = await store.evidence([IP, "198.51.100.1"])
    assert list(found) == [IP]
    assert [e.request_id for e in found[IP]] == ["a", "b"]
    assert await store.unban(IP)
    assert await store.evidence([IP]) == {}
    # a new ban after the unban starts with fresh evidence
    clock.now += 1
    store.report(IP, "suspicious_path", Seen("GET", "/wp-admin", 404, "d"))
    store.report(IP, "suspicious_path", Seen("GET", "/wp-admin", 404, "e"))
    found = await store.evidence([IP])
    assert [e.request_id for e in found[IP]] == ["d", "e"]


def test_old_events_are_no_evidence_of_a_later_ban() -> None:
    store, clock = make()
    store.report(IP, "suspicious_path", Seen("GET", "/old", 404, "old"))
    clock.now += 3 * 60  # the score has left the window (2 * window_s)
    store.report(IP, "suspicious_path", Seen("GET", "/.env", 404, "n1"))
    assert store.banned(IP) is None
    store.report(IP, "suspicious_path", Seen("GET", "/.env", 404, "n2"))
    assert store.banned(IP) is not None
    assert [e.request_id for e in store.evidence_of(IP) or []] == ["n1", "n2"]


def test_evidence_of_scored_clients_is_bounded() -> None:
    store, _ = make(max_evidence=100)
    for i in range(5000):
        store.report(f"10.0.{i // 250}.{i % 250}", "not_found", Seen("GET", "/x", 404, "r"))
    sizes = store.sizes()
    assert sizes["evidence"] == 100
    assert sizes["scores"] == 5000
    for i in range(300):  # bans: two suspicious paths each
        ip = f"10.9.{i // 250}.{i % 250}"
        store.report(ip, "suspicious_path", Seen("GET", "/.env", 404, "r"))
        store.report(ip, "suspicious_path", Seen("GET", "/.env", 404, "r"))
    assert store.sizes()["ban_evidence"] == 100
    assert store.sizes()["evidence"] <= 100
    # the newest ban still has its evidence; the oldest gave its room
    assert store.evidence_of("10.9.1.49") is not None
    assert store.evidence_of("10.9.0.0") is None
