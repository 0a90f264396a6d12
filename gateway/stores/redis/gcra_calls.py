"""Calls of the GCRA script (``lua/gcra.lua``): packed for the lean connection, or through redis-py.

Arguments stay few: the keys, a flag (``1`` consumes, ``0`` only peeks), one string of
rate indexes (one per key), one string of costs (one per key; empty when each costs 1,
the common case), then each distinct rate once (emission interval in microseconds,
burst, period: 0 for a rolling rate, 1 hour, 2 day, 3 month for a calendar quota, whose
"emission interval" is one unit and burst the quota).  The reply is two integers per
key (:data:`REPLY_WIDTH`), in order: the remaining requests when allowed (>= 0), or
``-(retry after + 1)`` when refused (<= -1); then the reset; both times in
microseconds (:func:`decision_of`).

Through redis-py, a Cluster's keys are grouped by hash slot: one script call per slot,
all in one pipeline (redis-py splits it per node); a standalone Redis gets one call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any, Final

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.core.calendar import PERIOD_CODES
from gateway.core.gcra import Decision, Rate
from gateway.stores.limiter import MAX_KEY_CHARS, bounded_key
from gateway.stores.redis.resp import FutureWaiter, RespClient, Waiter, bulk_string
from gateway.stores.redis.scripts import Script, is_noscript

__all__ = [
    "REPLY_WIDTH",
    "Discard",
    "PolicyKeys",
    "decision_of",
    "evalsha_head",
    "evaluate",
    "pack_evalsha",
    "peek_lean",
    "raw_key",
]

BULKS_KEPT: Final = 1024  # client keys whose bulk strings a policy keeps
REPLY_WIDTH: Final = 2  # integers in the script's reply per key


def decision_of(first: int, reset_us: int) -> Decision:
    """One key's decision out of its two integers in the script's reply."""
    if first >= 0:  # allowed, with ``first`` requests left
        return Decision(True, first, 0.0, reset_us / 1e6)  # noqa: FBT003
    return Decision(False, 0, (-first - 1) / 1e6, reset_us / 1e6)  # noqa: FBT003


_MAX_KEY_CHARS: Final = MAX_KEY_CHARS  # a constant of this module: no lookup per use


class PolicyKeys:
    """What a policy's checks share: its key's head and tail, its rate as script args.

    A key goes into a batch already as the RESP bulk string it is sent as
    (``$<length>\\r\\n<key>\\r\\n``, :meth:`bulk_of`), so packing a batch formats
    nothing per key; :func:`raw_key` gives the key back.  The bulk strings of the
    client keys seen last are kept (a client sends many requests: its key is then one
    dict lookup, not a bound, an encoding and a formatting each time).
    """

    __slots__ = ("_bulks", "head", "params", "rate", "rate_args", "tail")

    def __init__(self, rate: Rate, head: bytes, tail: bytes, params: tuple[int, int, int]) -> None:
        self.rate = rate
        self.head = head
        self.tail = tail
        self.params = params  # emission interval in microseconds, burst, period code
        self.rate_args = b"".join(bulk_string(p) for p in params)
        self._bulks: dict[str, bytes] = {}  # client key -> its key as a bulk string

    def bulk_of(self, key: str) -> bytes:
        """The key of client ``key`` (:func:`bounded_key`) as a RESP bulk string."""
        bulk = self._bulks.get(key)
        if bulk is None:
            if len(self._bulks) >= BULKS_KEPT:
                self._bulks.clear()  # O(n) once per BULKS_KEPT new keys: amortised O(1)
            if len(key) > _MAX_KEY_CHARS:
                key_bytes = bounded_key(key).encode("utf-8", "surrogatepass")
            else:
                key_bytes = key.encode("utf-8", "surrogatepass")
            whole = self.head + key_bytes + self.tail
            bulk = self._bulks[key] = b"$%d\r\n%b\r\n" % (len(whole), whole)
        return bulk

    @classmethod
    def of(cls, prefix: str, policy: str, rate: Rate) -> PolicyKeys:
        """A policy's keys: ``<prefix>rl:{<policy>:<client key>}:<requests>:<period_s>:<burst>``
        (a calendar quota: ``...:<requests>:<period>:<requests>``).

        The emission interval is rounded up to a whole microsecond.
        """
        if rate.calendar is not None:
            return cls(
                rate,
                f"{prefix}rl:{{{policy}:".encode(),
                f"}}:{rate.requests}:{rate.calendar}:{rate.burst}".encode(),
                (1, rate.burst, PERIOD_CODES[rate.calendar]),
            )
        emission_us = max(1, math.ceil(rate.period_s * 1_000_000 / rate.requests - 1e-6))
        return cls(
            rate,
            f"{prefix}rl:{{{policy}:".encode(),
            f"}}:{rate.requests}:{rate.period_s!r}:{rate.burst}".encode(),
            (emission_us, rate.burst, 0),
        )


class Discard(Waiter):
    """A reply nobody needs (SCRIPT LOAD ahead of a retried call: the call tells)."""

    __slots__ = ()

    def resolve(self, reply: Any) -> None:
        pass


def raw_key(bulk: bytes) -> bytes:
    """The key of a RESP bulk string made by :meth:`PolicyKeys.bulk_of`."""
    return bulk[bulk.index(b"\n") + 1 : -2]


def evalsha_head(script: Script) -> bytes:
    """The command name and SHA of a packed ``EVALSHA`` of ``script``."""
    return b"$7\r\nEVALSHA\r\n" + bulk_string(script.sha)


def costs_arg(costs: Sequence[int] | None) -> bytes:
    """The script's costs argument: empty when each key costs 1."""
    if costs is None or all(c == 1 for c in costs):
        return b""
    return b" ".join(b"%d" % c for c in costs)


def pack_evalsha(
    head: bytes,
    keys: Sequence[bytes],
    pks: Sequence[PolicyKeys],
    flag: bytes,
    costs: Sequence[int] | None = None,
) -> bytes:
    """``EVALSHA`` of the GCRA script over ``keys`` (RESP bulk strings,
    :meth:`PolicyKeys.bulk_of`), as RESP (``head``: :func:`evalsha_head`); ``costs``: one per
    key (None: 1 each)."""
    rates: dict[bytes, bytes] = {}
    indexes = []
    for pk in pks:
        index = rates.get(pk.rate_args)
        if index is None:
            index = rates[pk.rate_args] = b"%d" % (len(rates) + 1)
        indexes.append(index)
    joined = b" ".join(indexes)
    spent = costs_arg(costs)
    n = len(keys)
    parts = [
        b"*%d\r\n%b%b" % (n + 6 + 3 * len(rates), head, bulk_string(n)),
        *keys,
        b"$1\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (flag, len(joined), joined, len(spent), spent),
        *rates,
    ]
    return b"".join(parts)


async def peek_lean(client: RespClient, script: Script, payload: bytes, timeout_s: float) -> Any:
    """A packed call over the lean connection, awaited (NOSCRIPT: load, call again)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    future: asyncio.Future[Any] = loop.create_future()
    client.send(payload, FutureWaiter(deadline, future))
    try:
        return await future
    except ResponseError as exc:
        if not is_noscript(exc):
            raise
    future = loop.create_future()
    client.send_many(
        script.load_command + payload,
        (Discard(deadline), FutureWaiter(deadline, future)),
    )
    return await future


async def evaluate(
    redis: Any,
    script: Script,
    keys: Sequence[bytes],
    pks: Sequence[PolicyKeys],
    *,
    cluster: bool,
    consume: bool,
    costs: Sequence[int] | None = None,
) -> list[Any]:
    """The GCRA script through redis-py: :data:`REPLY_WIDTH` integers per key, in order;
    ``costs``: one per key (None: 1 each)."""
    flag = "1" if consume else "0"
    if not cluster:
        groups = [list(range(len(keys)))]
    else:
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(key), []).append(i)
        groups = list(by_slot.values())
    replies = await _run_groups(redis, script, keys, pks, groups=groups, flag=flag, costs=costs)
    w = REPLY_WIDTH
    flat: list[Any] = [0] * (w * len(keys))
    for group, reply in zip(groups, replies, strict=True):
        if not isinstance(reply, list) or len(reply) != w * len(group):
            raise RedisConnectionError(f"unexpected script reply: {reply!r:.200}")
        for j, index in enumerate(group):
            flat[w * index : w * index + w] = reply[w * j : w * j + w]
    return flat


async def _run_groups(
    redis: Any,
    script: Script,
    keys: Sequence[bytes],
    pks: Sequence[PolicyKeys],
    *,
    groups: list[list[int]],
    flag: str,
    costs: Sequence[int] | None,
) -> list[Any]:
    """One script call per group: a single EVALSHA, or a pipeline of them."""
    sha = script.sha
    commands: list[tuple[Any, ...]] = []
    for group in groups:
        rates: dict[tuple[int, int, int], int] = {}
        indexes = []
        for i in group:
            params = pks[i].params
            index = rates.get(params)
            if index is None:
                index = rates[params] = len(rates) + 1
            indexes.append(str(index))
        args: list[Any] = [sha, len(group)]
        args += [keys[i] for i in group]
        spent = costs_arg([costs[i] for i in group] if costs is not None else None)
        args += (flag, " ".join(indexes), spent)
        for params in rates:
            args += params
        commands.append(tuple(args))
    if len(commands) == 1:
        try:
            return [await redis.evalsha(*commands[0])]
        except NoScriptError:
            await script.load(redis)
            return [await redis.evalsha(*commands[0])]
    replies = await _pipeline(redis, commands)
    redo = [i for i, r in enumerate(replies) if isinstance(r, Exception)]
    if redo:
        if not all(isinstance(replies[i], NoScriptError) for i in redo):
            raise replies[redo[0]]
        await script.load(redis)
        again = await _pipeline(redis, [commands[i] for i in redo])
        for i, reply in zip(redo, again, strict=True):
            if isinstance(reply, Exception):
                raise reply
            replies[i] = reply
    return replies


async def _pipeline(redis: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for command in commands:
            # execute_command: redis-py's cluster pipeline refuses .evalsha() by name,
            # but routes EVALSHA by its keys (one slot per command here)
            pipe.execute_command("EVALSHA", *command)
        return list(await pipe.execute(raise_on_error=False))
