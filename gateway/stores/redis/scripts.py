"""The Lua scripts of the Redis stores (``lua/``), called by SHA.

A script is read once from the package and called with ``EVALSHA``; after a
``NOSCRIPT`` reply (a restarted or failed-over Redis has an empty script cache) it is
loaded again and the calls that missed it are sent once more.  Every store goes
through :class:`Script`, so there is one way a script is found, hashed and reloaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from gateway.stores.redis.resp import pack_command

__all__ = ["Call", "Script", "is_noscript", "load_script", "reply_text"]

Call = tuple[Sequence[Any], Sequence[Any]]
"""One script call: its keys, its arguments."""


def load_script(name: str) -> str:
    """The source of ``lua/<name>``."""
    return resources.files("gateway.stores.redis").joinpath("lua", name).read_text("utf-8")


def reply_text(value: Any) -> str:
    """A script's reply item as text (clients may decode replies or not)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_noscript(exc: object) -> bool:
    """Whether a reply (of the lean connection: an instance, not raised) is NOSCRIPT."""
    return isinstance(exc, ResponseError) and str(exc).startswith("NOSCRIPT")


class Script:
    """A Lua script called by SHA, loaded again after NOSCRIPT."""

    __slots__ = ("load_command", "sha", "text")

    def __init__(self, name: str) -> None:
        self.text = load_script(name)
        self.sha = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()
        # for the lean connection (gateway.stores.redis.resp): written ahead of a retry
        self.load_command = pack_command("SCRIPT", "LOAD", self.text)

    async def load(self, redis: Any) -> None:
        """Load the script into ``redis`` (a redis-py client)."""
        await redis.script_load(self.text)

    async def run(self, redis: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """One call through redis-py; NOSCRIPT: load, call again."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    async def run_many(self, redis: Any, calls: Sequence[Call]) -> list[Any]:
        """One pipeline of calls; a result is an exception when its call failed."""
        if not calls:
            return []
        results = await self._pipeline(redis, calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.load(redis)
            again = await self._pipeline(redis, [calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, redis: Any, calls: Sequence[Call]) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
