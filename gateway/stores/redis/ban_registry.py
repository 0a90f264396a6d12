"""The shared list of bans in force, in Redis (``lua/bans_registry.lua``).

``{P bans}`` and its companions (one hash tag, one cluster slot): the bans in force (a
hash of JSON records), their expiries, and a change log (a zset of IPs by sequence
number) that lets each replica fetch only what changed.  Bans survive a gateway
restart; at most ``max_bans`` are kept (the ones closest to their end make room).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from gateway.stores.bans import Ban
from gateway.stores.redis.scripts import Call, Script, reply_text

__all__ = ["BanRegistry", "merge", "records"]


def _encode(ban: Ban) -> str:
    record = {
        "reason": ban.reason,
        "score": ban.score,
        "expires_at": ban.expires_at,
        "offences": ban.offences,
        "banned_at": ban.banned_at,
    }
    return orjson.dumps(record).decode()


def _decode(ip: str, record: str) -> Ban | None:
    try:
        r = orjson.loads(record)
        return Ban(
            ip,
            str(r["reason"]),
            float(r["score"]),
            float(r["expires_at"]),
            int(r["offences"]),
            float(r["banned_at"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class BanRegistry:
    """The calls of the shared ban list; every one touches the keys of one slot."""

    __slots__ = (
        "_batch_size",
        "_keys",
        "_max_bans",
        "_max_log",
        "_redis",
        "_script",
        "_sync_limit",
    )

    def __init__(
        self,
        redis: Any,
        *,
        key_prefix: str,
        max_bans: int,
        max_log: int,
        sync_limit: int,
        batch_size: int,
    ) -> None:
        self._redis = redis
        tag = "{" + key_prefix + "bans}"
        self._keys = [tag, tag + ":log", tag + ":seq", tag + ":exp", tag + ":trim"]
        self._script = Script("bans_registry.lua")
        self._max_bans = max_bans
        self._max_log = max_log
        self._sync_limit = sync_limit
        self._batch_size = batch_size

    def _add_call(self, ban: Ban) -> Call:
        args = ["add", ban.ip, _encode(ban), repr(ban.expires_at), self._max_bans, self._max_log]
        return self._keys, args

    async def add(self, bans: Sequence[Ban]) -> list[Any]:
        """Add (or renew) bans in one pipeline; per ban its change's sequence number, or
        the exception its call failed with."""
        return await self._script.run_many(self._redis, [self._add_call(b) for b in bans])

    async def write_back(self, bans: Iterable[Ban], now: float) -> None:
        """Add the bans still in force at ``now``, in chunks; raise on the first failure."""
        live = [b for b in bans if b.expires_at > now]
        for i in range(0, len(live), self._batch_size):
            for result in await self.add(live[i : i + self._batch_size]):
                if isinstance(result, BaseException):
                    raise result

    async def lift(self, ip: str) -> int:
        """Remove the ban of ``ip``; the change's sequence number, 0 if there was none."""
        return int(await self._script.run(self._redis, self._keys, ["del", ip, self._max_log]))

    async def fetch(self, seq: int, *, full: bool) -> tuple[str, int, list[Any]]:
        """The changes since ``seq`` (``delta``), or every ban (``full``): the kind, the
        sequence number now, and flat ip, record pairs."""
        args = ["sync", seq, self._sync_limit, "1" if full else "0", 1000, self._max_log]
        reply = await self._script.run(self._redis, self._keys, args)
        return reply_text(reply[0]), int(reply_text(reply[1])), list(reply[2])

    async def all(self) -> dict[str, Ban]:
        """Every ban in the list, expired ones included."""
        bans: dict[str, Ban] = {}
        for key, record in (await self._redis.hgetall(self._keys[0])).items():
            ip = reply_text(key)
            ban = _decode(ip, reply_text(record))
            if ban is not None:
                bans[ip] = ban
        return bans


def records(items: Sequence[Any]) -> Iterable[tuple[str, Ban | None]]:
    """The ip, ban pairs of :meth:`BanRegistry.fetch`; ``None`` for a removed ban (an
    empty record) or a record that does not parse."""
    for i in range(0, len(items) - 1, 2):
        ip, record = reply_text(items[i]), reply_text(items[i + 1])
        yield ip, (_decode(ip, record) if record else None)


def merge(
    view: dict[str, Ban],
    own: dict[str, tuple[int, Ban | None]],
    kind: str,
    seq: int,
    items: Sequence[Any],
) -> tuple[dict[str, Ban], list[str]]:
    """A replica's view of the bans in force after a :meth:`BanRegistry.fetch` answer.

    ``view`` is replaced (``full``) or changed in place (``delta``).  ``own`` holds this
    replica's changes by their sequence numbers (a removal as ``None``): those the
    answer already includes are dropped from it, the later ones are kept over the
    answer.  Returns the view and the IPs whose bans are new to it (made elsewhere).
    """
    fresh: list[str] = []
    if kind == "full":
        old, view = view, {}
        for ip, ban in records(items):
            if ban is not None:
                view[ip] = ban
                if ip not in old:
                    fresh.append(ip)
    elif kind == "delta":
        for ip, ban in records(items):
            if ban is None:
                view.pop(ip, None)
            else:
                view[ip] = ban
                fresh.append(ip)
    # Our own changes made after this answer was read: keep them over it.
    for ip, (change, ban) in list(own.items()):
        if change <= seq or change == 0:
            del own[ip]
        elif ban is None:
            view.pop(ip, None)
        else:
            view[ip] = ban
    return view, fresh
