"""The GCRA script's reply, two integers a key, read back as decisions."""

from __future__ import annotations

import pytest

from gateway.core.gcra import Decision
from gateway.stores.redis.gcra_calls import REPLY_WIDTH, decision_of


def _d(allowed: bool, remaining: int, retry_s: float, reset_s: float) -> Decision:
    return Decision(allowed=allowed, remaining=remaining, retry_after_s=retry_s, reset_s=reset_s)


@pytest.mark.parametrize(
    ("first", "reset_us", "want"),
    [
        (5, 1_000, _d(True, 5, 0.0, 0.001)),  # noqa: FBT003
        (0, 250_000, _d(True, 0, 0.0, 0.25)),  # noqa: FBT003 - allowed, the last one left
        (-1, 7, _d(False, 0, 0.0, 7e-6)),  # noqa: FBT003 - refused, a retry of 0 us
        (-1_000_001, 2_000_000, _d(False, 0, 1.0, 2.0)),  # noqa: FBT003
        (-3_600_000_001, 3_600_000_000, _d(False, 0, 3600.0, 3600.0)),  # noqa: FBT003 - a quota
    ],
)
def test_a_keys_two_integers_read_back(first: int, reset_us: int, want: Decision) -> None:
    got = decision_of(first, reset_us)
    assert got == want
    assert type(got) is Decision
    assert type(got.allowed) is bool


def test_the_reply_is_two_integers_a_key() -> None:
    assert REPLY_WIDTH == 2
