"""The rate-limiter interface shared by the memory and Redis backends.

The pipeline resolves each applicable policy to a :class:`Check` (policy name, its
:class:`~gateway.core.gcra.Rate`, the client key) and asks a :class:`Limiter` for one
:class:`~gateway.core.gcra.Decision` per check.

Checks are decided independently: a request under several policies is refused when
any of them refuses, and the budget of the policies that allowed it is still consumed
(the behaviour of Envoy's ratelimit service).  Rolling back the others would need a
second round trip to Redis, and would let a client that is over one limit probe the
others for free.

The backends are :mod:`gateway.stores.memory.limiter`, :mod:`gateway.stores.redis.limiter`
and :mod:`gateway.stores.noredis`; :func:`gateway.stores.make_limiter` picks one.

Every backend failure surfaces in one way only: :class:`BackendUnavailable`, raised
by :meth:`Limiter.decide` when ``on_backend_error`` is ``deny``.  With ``local`` and
``allow`` the limiter answers anyway and counts the failure in
``gateway_ratelimit_backend_errors_total``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NamedTuple

from gateway.config import Policy, RateLimit
from gateway.core.gcra import Decision, Rate
from gateway.core.keys import digest

__all__ = [
    "MAX_KEY_CHARS",
    "BackendUnavailable",
    "Check",
    "Clock",
    "Limiter",
    "bounded_key",
    "plan_store",
    "rates_from_config",
    "unlimited",
]

Clock = Callable[[], float]

MAX_KEY_CHARS = 128
"""Keys longer than this are stored as a digest: a guard of the stores' memory. The
pipeline's keys stay under it (:func:`gateway.core.keys.policy_key` digests a client's
value past 64 bytes), so they are stored as they are."""


class Check(NamedTuple):
    """One policy to apply to one client key (already resolved by the pipeline), taking
    ``cost`` units of its budget (the route's ``cost``)."""

    policy: str
    rate: Rate
    key: str
    cost: int = 1


class BackendUnavailable(Exception):  # noqa: N818 - the name is the contract
    """The shared backend cannot decide and ``on_backend_error`` is ``deny``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate-limit backend unavailable, retry after {retry_after_s:.3f} s")
        self.retry_after_s = retry_after_s


class Limiter(ABC):
    """Decides checks; one :class:`Decision` per :class:`Check`, in the same order."""

    # the UTC time calendar quotas are read at (the month of a RateLimit-Policy's w=)
    wall_clock: Clock = staticmethod(time.time)

    @abstractmethod
    def decide_local(self, checks: Sequence[Check]) -> list[Decision] | None:
        """Answer without I/O when possible (consuming budget), else ``None``.

        ``None`` means the caller must ``await decide(checks)``.
        """

    def decide_key(
        self, policies: Sequence[tuple[str, Rate]], key: str, cost: int = 1
    ) -> list[Decision] | None:
        """:meth:`decide_local` for policies (name, rate) that all apply to one key."""
        return self.decide_local([Check(name, rate, key, cost) for name, rate in policies])

    @abstractmethod
    async def decide(self, checks: Sequence[Check]) -> list[Decision]:
        """Decide every check, consuming budget for the allowed ones."""

    def submit(self, checks: Sequence[Check]) -> Awaitable[list[Decision]]:
        """:meth:`decide` as something to await (a shared backend gives its future)."""
        return self.decide(checks)

    def submit_key(
        self, policies: Sequence[tuple[str, Rate]], key: str, cost: int = 1
    ) -> Awaitable[list[Decision]]:
        """:meth:`submit` for policies (name, rate) that all apply to one key."""
        return self.submit([Check(name, rate, key, cost) for name, rate in policies])

    @abstractmethod
    async def peek(self, checks: Sequence[Check]) -> list[Decision]:
        """What :meth:`decide` would answer now, consuming nothing."""

    @abstractmethod
    def reconfigure(self, rates: Mapping[str, Rate]) -> None:
        """Install new policies: keep the state of those whose rate is unchanged."""

    async def start(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Start background work (sweeps, announcements)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Stop background work and release connections."""

    @property
    def backend_ok(self) -> bool:
        """``False`` while the shared backend is failing."""
        return True


def unlimited(rate: Rate, cost: int = 1) -> Decision:
    """The answer when limits are not applied (``on_backend_error: allow``)."""
    return Decision(
        allowed=True,
        remaining=max(0, rate.burst - cost),
        retry_after_s=0.0,
        reset_s=rate.emission_s * cost,
    )


def plan_store(policy: str, plan: str) -> str:
    """The name a policy's budgets for one plan are kept under (``requests_by_plan``):
    apart from the policy's own, as a plan's rate is its own."""
    return f"{policy}@{plan}"


def policy_rate(policy: Policy, requests: int | None = None) -> Rate:
    """The rate of a policy; ``requests`` (a plan's) in place of its own, with its burst
    when the policy gives none."""
    if policy.requests is None or (policy.period_s is None and policy.period is None):
        msg = "a concurrency policy has no rate"
        raise ValueError(msg)
    n = policy.requests if requests is None else requests
    if policy.period is not None:
        return Rate.quota(n, policy.period)
    burst = policy.burst if policy.burst is not None else n
    return Rate(n, float(policy.period_s or 1), burst)


def rates_from_config(cfg: RateLimit) -> dict[str, Rate]:
    """The rate of each rate policy, and of each of its plans (:func:`plan_store`)."""
    rates = {}
    for name, p in cfg.policies.items():
        if p.concurrency:
            continue
        rates[name] = policy_rate(p)
        for plan, requests in p.requests_by_plan.items():
            rates[plan_store(name, plan)] = policy_rate(p, requests)
    return rates


def bounded_key(key: str) -> str:
    """The key itself, or a fixed-size digest of it when longer than MAX_KEY_CHARS.

    Both backends store a key through this, so they agree; SHA-256 of the whole key
    (:func:`gateway.core.keys.digest`), never a cut.
    """
    if len(key) <= MAX_KEY_CHARS:
        return key
    return "#" + digest(key)
