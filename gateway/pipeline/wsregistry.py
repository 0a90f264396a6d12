"""Open WebSockets by client key: what lets a ban, a deny-list reload, an idle timeout and
the drain reach them (SPEC section 9; the decisions are :mod:`gateway.core.wsguard`).

Sockets are indexed by the client's key (its address; an IPv6 client's prefix, the key
its bans use), so a ban looks up that client's sockets only, and counted by upstream
name, so a reload that rebuilds an upstream's pool does not reset the count that caps
them at its ``max_connections``. A socket is entered before the upstream is asked (its
handshake holds a connection too) and left when it ends: memory is one small object an
open socket, bounded by the caps.

Bans reach sockets two ways: the ban store calls :meth:`WebSocketRegistry.on_ban` when a
ban comes into force here (made here, or synced from Redis, made by another replica),
and a sweep twice a second asks the ban store about each client key that holds sockets
(a dict lookup each), which also catches what has no event: a switch from shadow to
enforce mode. The sweep also ends idle sockets: a message sets a flag on its socket
(no clock read, no timer per message); the sweep turns a set flag into "seen now".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, web

from gateway.core.wsguard import BANNED, CLOSE_POLICY, verdict
from gateway.tasks import stop_task

if TYPE_CHECKING:
    from gateway.core.client_ip import IPAddress
    from gateway.pipeline.snapshot import Snapshot
    from gateway.stores.bans import BanStore

__all__ = ["OpenSocket", "WebSocketRegistry", "close_ws"]

CLOSE_S = 1.0
"""How long a close may take before the client's connection is dropped."""


async def close_ws(
    ws: web.WebSocketResponse,
    transport: asyncio.Transport | None,
    code: int = WSCloseCode.GOING_AWAY,
    message: bytes = b"",
) -> None:
    """Close a client's WebSocket within CLOSE_S, else drop its connection (a client that
    reads nothing cannot hold the close)."""
    try:
        async with asyncio.timeout(CLOSE_S):
            await ws.close(code=code, message=message)
    except Exception:  # a timeout or a broken connection: drop it
        if transport is not None:
            transport.abort()


class OpenSocket:
    """One client's WebSocket, from its upgrade until it ends."""

    __slots__ = (
        "active",
        "client",
        "closing",
        "exempt",
        "key",
        "last_seen",
        "transport",
        "upstream",
        "ws",
    )

    def __init__(self, key: str, client: IPAddress | None, upstream: str, exempt: bool) -> None:
        self.key = key
        self.client = client
        self.upstream = upstream
        self.exempt = exempt  # in allow_cidrs: never banned
        self.ws: web.WebSocketResponse | None = None  # None until the client's handshake
        self.transport: asyncio.Transport | None = None
        self.active = False  # a frame passed since the last sweep
        self.last_seen = 0.0
        self.closing: tuple[int, str] | None = None


class WebSocketRegistry:
    """The open WebSockets of this process."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._by_key: dict[str, dict[OpenSocket, None]] = {}
        self._per_upstream: dict[str, int] = {}
        self._count = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[OpenSocket]:
        for socks in list(self._by_key.values()):
            yield from list(socks)

    def open_for(self, key: str) -> int:
        """Open WebSockets of one client key."""
        socks = self._by_key.get(key)
        return 0 if socks is None else len(socks)

    def open_to(self, upstream: str) -> int:
        """Open WebSockets to one upstream (by name: a rebuilt pool keeps the count)."""
        return self._per_upstream.get(upstream, 0)

    # -- a socket's life -------------------------------------------------------------

    def add(
        self, key: str, client: IPAddress | None, upstream: str, *, exempt: bool = False
    ) -> OpenSocket:
        """Enter a socket before its upstream is asked; :meth:`remove` it in a finally."""
        sock = OpenSocket(key, client, upstream, exempt)
        self._by_key.setdefault(key, {})[sock] = None
        self._per_upstream[upstream] = self._per_upstream.get(upstream, 0) + 1
        self._count += 1
        return sock

    def attach(
        self,
        sock: OpenSocket,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        now: float,
    ) -> None:
        """The client's handshake is done: the socket can be closed from now on (at once,
        when a ban or the drain came during the handshakes)."""
        sock.ws = ws
        sock.transport = transport
        sock.last_seen = now
        if sock.closing is not None:
            code, reason = sock.closing
            self._spawn_close(sock, ws, code, reason)

    def remove(self, sock: OpenSocket) -> None:
        socks = self._by_key.get(sock.key)
        if socks is None or socks.pop(sock, False) is False:
            return
        if not socks:
            del self._by_key[sock.key]
        n = self._per_upstream[sock.upstream] - 1
        if n:
            self._per_upstream[sock.upstream] = n
        else:
            del self._per_upstream[sock.upstream]
        self._count -= 1

    # -- closing ---------------------------------------------------------------------

    def close(self, sock: OpenSocket, code: int, reason: str) -> bool:
        """Close one socket (in the background); False when it is already closing."""
        if sock.closing is not None:
            return False
        sock.closing = (code, reason)
        if sock.ws is not None:  # else attach() closes it
            self._spawn_close(sock, sock.ws, code, reason)
        return True

    def _spawn_close(
        self, sock: OpenSocket, ws: web.WebSocketResponse, code: int, reason: str
    ) -> None:
        task = asyncio.ensure_future(close_ws(ws, sock.transport, code, reason.encode("ascii")))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        if code == CLOSE_POLICY:  # idle and drain closes are routine: not logged each
            self._log.info(
                "websocket_closed",
                client_key=sock.key,
                upstream=sock.upstream,
                code=code,
                reason=reason,
            )

    def on_ban(self, key: str, bans: BanStore) -> None:
        """A ban of ``key`` came into force here: close that client's sockets with 1008.
        O(1) for a client that holds none (the usual case)."""
        socks = self._by_key.get(key)
        if socks is None or bans.banned(key) is None:
            return
        for sock in list(socks):
            if not sock.exempt:
                self.close(sock, *BANNED)

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket and wait for the closes (each bounded by CLOSE_S): the drain."""
        for sock in self:
            self.close(sock, code, reason)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the sweep -------------------------------------------------------------------

    def sweep(self, now: float, snap: Snapshot, bans: BanStore, *, lists: bool = False) -> None:
        """Close the sockets of banned clients, and idle ones; with ``lists`` (after a
        reload) re-read each socket's client against ``deny_cidrs`` and ``allow_cidrs``."""
        idle_timeout_s = snap.settings.config.websocket.idle_timeout_s
        deny = snap.deny if snap.has_deny else None
        allow = snap.allow if snap.has_allow else None
        for key, socks in list(self._by_key.items()):
            banned = bans.banned(key) is not None
            for sock in list(socks):
                if sock.closing is not None:
                    continue
                client = sock.client
                denied = False
                if lists and client is not None:
                    denied = deny is not None and client in deny
                    sock.exempt = allow is not None and client in allow
                if sock.ws is None:  # its handshakes are under way: not idle yet
                    idle_s = 0.0
                elif sock.active:
                    sock.active = False
                    sock.last_seen = now
                    idle_s = 0.0
                else:
                    idle_s = now - sock.last_seen
                found = verdict(
                    denied=denied,
                    banned=banned and not sock.exempt,
                    idle_s=idle_s,
                    idle_timeout_s=idle_timeout_s,
                )
                if found is not None:
                    self.close(sock, *found)

    async def _run(self, interval_s: Callable[[], float], sweep: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval_s())
            try:
                sweep()
            except Exception as exc:  # keep sweeping whatever happens
                self._log.error("websocket_sweep_failed", error=repr(exc))

    def start(self, interval_s: Callable[[], float], sweep: Callable[[], None]) -> None:
        """Call ``sweep()`` every ``interval_s()`` seconds until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(interval_s, sweep), name="ws-sweep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
