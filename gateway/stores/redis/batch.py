"""Rate-limit decisions of one event-loop turn sharing one round trip to Redis.

Decisions requested in the same turn join one :class:`Batch`, and a callback scheduled
with ``call_soon`` sends it as one script call over all its keys (standalone), or one
pipeline of script calls, one per hash slot (Cluster).  Up to ``max_inflight_batches``
round trips run at once (``max_batch`` checks each); beyond that, decisions wait for
the next one and batches grow by themselves.  Each ``decide()`` call in a batch is one
:class:`Part` with its own future, settled from the batch's decisions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from gateway.core.gcra import Decision, Rate
from gateway.stores.limiter import Check
from gateway.stores.redis.gcra_calls import PolicyKeys
from gateway.stores.redis.resp import Waiter

__all__ = ["Batch", "Part"]


class Part:
    """One decide() call in a batch: its checks are ``size`` from ``start`` on.

    A plain class, not a named tuple: one is made on every decision, and a compiled
    build makes and reads it without the interpreter. The checks it put in the batch
    are kept as given (``checks``), or, for a route's policies on one client key, as
    those (``policies``, ``key``, ``cost``): their Check objects are made only if the
    fallback needs them (Redis failed), not on every request."""

    __slots__ = ("cached", "checks", "cost", "future", "key", "policies", "size", "start")

    def __init__(  # noqa: PLR0917 - made in two places, by the limiter
        self,
        future: asyncio.Future[list[Decision]],
        start: int,
        size: int,
        cached: list[Decision | None] | None,  # answers known locally, None where Redis answers
        checks: Sequence[Check] | None = None,
        policies: Sequence[tuple[str, Rate]] = (),
        key: str = "",
        cost: int = 1,
    ) -> None:
        self.future = future
        self.start = start
        self.size = size
        self.cached = cached
        self.checks = checks
        self.policies = policies
        self.key = key
        self.cost = cost

    def sent(self) -> Sequence[Check]:
        """The checks this call put into the batch, in the batch's order."""
        if self.checks is not None:
            return self.checks
        key, cost = self.key, self.cost
        return [Check(name, rate, key, cost) for name, rate in self.policies]

    def answer(self, decisions: list[Decision]) -> list[Decision]:
        """This call's decisions out of the batch's."""
        if self.cached is None:
            return decisions[self.start : self.start + self.size]
        answers = iter(decisions[self.start :])
        return [d if d is not None else next(answers) for d in self.cached]


class Batch(Waiter):
    """Checks of one loop turn sharing a round trip; one future per decide() call."""

    __slots__ = (
        "costs",
        "keys",
        "on_reply",
        "parts",
        "payload",
        "pks",
        "retried",
        "sent_at",
    )

    def __init__(self, on_reply: Callable[[Batch, Any], None], deadline: float) -> None:
        self.deadline = deadline  # loop time: first queued + timeout_s
        self.on_reply = on_reply  # the limiter's handler of this batch's reply
        self.parts: list[Part] = []
        self.keys: list[bytes] = []  # RESP bulk strings (PolicyKeys.bulk)
        self.pks: list[PolicyKeys] = []
        # one cost per key, once a key costs more than 1 (None until then: all cost 1)
        self.costs: list[int] | None = None
        self.sent_at = 0.0  # limiter clock
        self.payload = b""
        self.retried = False

    def add_costs(self, start: int, costs: list[int]) -> None:
        """The costs of the keys added from ``start`` on (call after adding them)."""
        mine = self.costs
        if mine is None:
            if all(c == 1 for c in costs):
                return
            mine = self.costs = [1] * start
        mine += costs

    def sent_checks(self) -> list[Check]:
        """Every check in the batch, in the order of its keys (for the fallback)."""
        out: list[Check] = []
        for part in self.parts:
            out += part.sent()
        return out

    def resolve(self, reply: Any) -> None:
        self.on_reply(self, reply)

    def settle(self, decisions: list[Decision]) -> None:
        for part in self.parts:
            try:  # noqa: SIM105 - no context manager's calls per decision
                part.future.set_result(part.answer(decisions))
            except asyncio.InvalidStateError:
                pass  # cancelled: its caller went away (set only here, once)

    def cancel(self) -> None:
        for part in self.parts:
            part.future.cancel()
