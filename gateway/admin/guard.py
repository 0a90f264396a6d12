"""A bound on guessing the admin token: a budget of failed authentications per client.

Each client address (an IPv6 client by its prefix, as for the rate limits) may send a
wrong or missing token :data:`FAILURE_RATE` ``burst`` times at once, then once more
every ``emission_s``; past that, every admin call that needs the token is refused (429)
until the budget refills, the right token included, so that a guess that happens to be
right tells the guesser nothing.  The right token costs nothing, and from another
address it still works.  The probes, ``/metrics`` and the operator page's files need no
token and are never refused.

The state is a :class:`~gateway.core.failure_budget.FailureBudget` held for the life of
the process (a reload does not hand out fresh guesses), bounded to :data:`MAX_CLIENTS`
addresses.  Refusals are counted in ``gateway_admin_auth_failures_total{result}``; an
address that runs out logs one ``admin_auth_throttled`` line (and a spray of addresses
is capped by an :class:`~gateway.logs.EventBudget`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.core.failure_budget import FailureBudget
from gateway.core.gcra import Rate
from gateway.logs import EventBudget

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = ["FAILURE_RATE", "MAX_CLIENTS", "AdminAuthGuard"]

FAILURE_RATE = Rate(60, 60.0, 100)
"""Failed admin authentications a client address may make: 100 at once, then one a
second. Enough for a script or a test suite that checks its 401s, and 86,400 guesses a
day at most, nothing against a token of 16 random bytes or more."""

MAX_CLIENTS = 10_000
"""Addresses remembered at most (the least recent failure is forgotten first)."""

LOG_LINES_PER_S = 5.0
"""``admin_auth_throttled`` lines a second at most, whatever the number of addresses."""


class AdminAuthGuard:
    """Asked before the token is compared (:meth:`wait_s`), told when it did not match
    (:meth:`failed`); ``now`` is a monotonic clock."""

    __slots__ = ("_budget", "_log", "_log_budget", "_throttled", "_unauthorized")

    def __init__(
        self,
        metrics: Metrics,
        log: Any,
        *,
        rate: Rate = FAILURE_RATE,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._budget = FailureBudget(rate, max_keys=max_clients)
        self._unauthorized = metrics.admin_auth_failures.labels("unauthorized")
        self._throttled = metrics.admin_auth_failures.labels("throttled")
        self._log = log
        self._log_budget = EventBudget(LOG_LINES_PER_S)

    def __len__(self) -> int:
        return len(self._budget)

    def wait_s(self, client: str, now: float) -> float:
        """0.0: ``client`` may try its token; else the seconds it must wait (counted)."""
        wait = self._budget.wait_s(client, now)
        if wait > 0.0:
            self._throttled.inc()
        return wait

    def failed(self, client: str, now: float) -> None:
        """``client`` sent a wrong or missing token: one failure spent."""
        self._unauthorized.inc()
        budget = self._budget
        budget.spend(client, now)
        # a client is asked first, so only the failure that spends its last one gets
        # here with nothing left: one line when it runs out, none for the refusals
        wait = budget.wait_s(client, now)
        if wait > 0.0:
            dropped = self._log_budget.take(now)
            if dropped is not None:
                self._log.warning(
                    "admin_auth_throttled",
                    client_ip=client,
                    failures=budget.rate.burst,
                    window_s=budget.rate.period_s,
                    retry_after_s=round(wait, 3),
                    suppressed=dropped,
                )
