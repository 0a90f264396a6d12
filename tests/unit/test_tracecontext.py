"""W3C Trace Context: which traceparent values are continued, and what goes upstream."""

from __future__ import annotations

import random

import pytest

from gateway.core.tracecontext import (
    MAX_TRACESTATE,
    TraceIds,
    parse_traceparent,
    start_or_continue,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (VALID, (TRACE, PARENT, 1)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, 0)),
        (f"00-{TRACE}-{PARENT}-09", (TRACE, PARENT, 9)),  # other flag bits are kept
        # A later version: the four known fields are read, more may follow after '-'.
        (f"01-{TRACE}-{PARENT}-01", (TRACE, PARENT, 1)),
        (f"cc-{TRACE}-{PARENT}-01-what-the-future-holds", (TRACE, PARENT, 1)),
        # Invalid.
        ("", None),
        ("garbage", None),
        (f"ff-{TRACE}-{PARENT}-01", None),  # version ff is forbidden
        (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four fields
        (f"cc-{TRACE}-{PARENT}-01extra", None),
        (f"00-{TRACE.upper()}-{PARENT}-01", None),  # upper-case hex
        (f"00-{TRACE}-{PARENT.upper()}-01", None),
        (f"0g-{TRACE}-{PARENT}-01", None),
        (f"00-{'0' * 32}-{PARENT}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE[:-1]}-{PARENT}-01", None),  # short trace id
        (f"00-{TRACE}-{PARENT}0-01", None),  # long parent id
        (f"00-{TRACE}-{PARENT}-1", None),
        (f"00-{TRACE}-{PARENT}-0x", None),
        (f"00_{TRACE}_{PARENT}_01", None),
        (f" 00-{TRACE}-{PARENT}-01", None),
        (f"00-{TRACE}-{PARENT}-01 ", None),
        (f"00-{TRACE[:16]}-{TRACE[16:]}-{PARENT}-01", None),
    ],
)
def test_parse_traceparent(value: str, parsed: tuple[str, str, int] | None) -> None:
    assert parse_traceparent(value) == parsed


def test_a_valid_traceparent_is_continued_with_the_gateways_own_span() -> None:
    ctx = start_or_continue([VALID], ["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"], 0.0)
    assert ctx.trace_id == TRACE
    assert ctx.parent_id == PARENT
    assert ctx.span_id != PARENT
    assert len(ctx.span_id) == 16
    assert int(ctx.span_id, 16) != 0
    assert ctx.sampled  # the caller's decision, whatever the ratio
    assert ctx.tracestate == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert ctx.traceparent == f"00-{TRACE}-{ctx.span_id}-01"


def test_an_unsampled_caller_stays_unsampled_at_ratio_one() -> None:
    ctx = start_or_continue([f"00-{TRACE}-{PARENT}-00"], None, 1.0)
    assert not ctx.sampled
    assert ctx.traceparent.endswith("-00")
    assert ctx.tracestate is None


@pytest.mark.parametrize(
    "traceparent",
    [None, [], ["garbage"], [f"00-{'0' * 32}-{PARENT}-01"], [VALID, VALID]],
    ids=["missing", "empty", "garbage", "zero-trace", "two-fields"],
)
def test_a_missing_or_invalid_traceparent_starts_a_new_trace_and_drops_tracestate(
    traceparent: list[str] | None,
) -> None:
    ctx = start_or_continue(traceparent, ["rojo=00f067aa0ba902b7"], 1.0)
    assert ctx.trace_id != TRACE
    assert len(ctx.trace_id) == 32
    assert int(ctx.trace_id, 16) != 0
    assert ctx.parent_id is None
    assert ctx.tracestate is None
    assert ctx.sampled
    assert parse_traceparent(ctx.traceparent) == (ctx.trace_id, ctx.span_id, 1)


@pytest.mark.parametrize(
    "state", [" ", "x" * (MAX_TRACESTATE + 1), "rojo=caf\u00e9", "rojo=a\x00b", "rojo=a\x7fb"]
)
def test_an_empty_oversized_or_unprintable_tracestate_is_dropped(state: str) -> None:
    assert start_or_continue([VALID], [state], 0.0).tracestate is None


def test_several_tracestate_fields_are_one_list() -> None:
    ctx = start_or_continue([VALID], ["congo=t61rcWkgMzE", "rojo=00f067aa0ba902b7"], 0.0)
    assert ctx.tracestate == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    state = "x" * MAX_TRACESTATE
    assert start_or_continue([VALID], [state], 0.0).tracestate == state


def test_new_traces_are_sampled_at_the_configured_ratio() -> None:
    chance = random.Random(1).random
    assert not any(start_or_continue(None, None, 0.0, chance=chance).sampled for _ in range(1000))
    assert all(start_or_continue(None, None, 1.0, chance=chance).sampled for _ in range(1000))
    share = sum(start_or_continue(None, None, 0.25, chance=chance).sampled for _ in range(4000))
    assert 0.22 < share / 4000 < 0.28


def test_ids_do_not_repeat() -> None:
    ids = {start_or_continue(None, None, 0.0).trace_id for _ in range(10_000)}
    assert len(ids) == 10_000


def test_ids_come_from_one_batch_of_random_bytes_at_a_time() -> None:
    calls: list[int] = []

    def fake_urandom(n: int) -> bytes:
        calls.append(n)
        return bytes(range(1, 49))  # 48 bytes: 96 hex characters

    ids = TraceIds(fake_urandom, batch=2)
    assert [ids.take(32), ids.take(16), ids.take(32), ids.take(16)] == [
        "0102030405060708090a0b0c0d0e0f10",
        "1112131415161718",
        "191a1b1c1d1e1f202122232425262728",
        "292a2b2c2d2e2f30",
    ]
    assert calls == [48]
    ids.take(16)  # past the batch: the next one is drawn
    assert calls == [48, 48]


def test_an_all_zero_id_is_never_handed_out() -> None:
    batches = iter([bytes(24), bytes(8) + bytes(range(1, 17))])
    ids = TraceIds(lambda _: next(batches), batch=1)
    assert ids.take(16) == "0102030405060708"
