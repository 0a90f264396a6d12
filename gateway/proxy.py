"""The upstream leg: one keep-alive pool per upstream, streaming both ways.

Everything the request pipeline needs from an upstream goes through
:class:`UpstreamClient`, so a leaner client can replace the aiohttp one without
touching the pipeline.  Header rules (hop-by-hop, X-Forwarded-*) live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.upstream_http import LeanPool, LeanResponse, UpstreamError

if TYPE_CHECKING:
    from gateway.config import Upstream

# RFC 9110 7.6.1 and the de-facto ones; plus whatever Connection names.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Never believed from an untrusted peer: the gateway sets its own.
FORWARDING = frozenset(
    h.lower() for h in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")
)
# Request fields not passed upstream as they are (the gateway sets its own or none).
DROP_UPSTREAM = FORWARDING | frozenset(("expect", "forwarded", "host"))


# Never dropped because Connection lists it: the body sent upstream is framed by it
# (without it, and without chunked coding, the upstream would read the body as the next
# request on its keep-alive connection).
_FRAMING = frozenset(("content-length",))


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (they are hop-by-hop too), framing excepted."""
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    tokens = frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
    return tokens - _FRAMING


def filter_header_lines(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    drop: frozenset[str],
) -> list[str]:
    r"""``headers`` without those in ``drop`` (lower-case; it includes :data:`HOP_BY_HOP`)
    and those the ``Connection`` field names, as ``Name: value\r\n`` lines."""
    listed = connection_tokens(headers)
    if listed:
        drop = drop | listed
    return [f"{name}: {value}\r\n" for name, value in headers.items() if name.lower() not in drop]


def header_pairs(lines: str) -> list[tuple[str, str]]:
    r"""``Name: value\r\n`` lines back as (name, value) pairs (for aiohttp's client)."""
    return [
        (name, value) for name, _, value in (ln.partition(": ") for ln in lines.split("\r\n") if ln)
    ]


def filter_header_list(
    headers: list[tuple[str, str]], drop: frozenset[str]
) -> list[tuple[str, str]]:
    """The same for a plain list of fields (an upstream's answer)."""
    listed = [v for n, v in headers if len(n) == 10 and n.lower() == "connection"]
    if listed:
        drop = drop | {t.strip().lower() for v in listed for t in v.split(",") if t.strip()}
    return [(n, v) for n, v in headers if (low := n.lower()) not in HOP_BY_HOP and low not in drop]


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The part of an upstream's config that shapes its pool (a change rebuilds it)."""

    url: str
    connect_timeout_s: float
    timeout_s: float
    max_connections: int

    @classmethod
    def of(cls, cfg: Upstream) -> UpstreamSettings:
        return cls(cfg.url, cfg.connect_timeout_s, cfg.timeout_s, cfg.max_connections)


@contextlib.contextmanager
def _upstream_errors() -> Iterator[None]:
    """Map the client's exceptions to :class:`UpstreamError` kinds (an upstream's refusal
    of a WebSocket upgrade is its answer, not an error: it passes through as it is)."""
    try:
        yield
    except aiohttp.WSServerHandshakeError:
        raise
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamError("connect", str(exc) or "connection refused", sent=False) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamError("timeout", "upstream did not answer in time", sent=True) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError("protocol", str(exc) or type(exc).__name__, sent=True) from exc


class UpstreamClient:
    """The way to one upstream: a lean keep-alive pool for HTTP, aiohttp for WebSockets."""

    __slots__ = ("_pool", "_session", "_ws_timeout", "base", "settings")

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.base = URL(settings.url)
        connector = aiohttp.TCPConnector(
            # WebSockets only; the handler caps them at max_connections and refuses the
            # next one at once: a wait for a free connection here would time out and
            # count against the breaker, which one client holding sockets could open
            limit=0,
            limit_per_host=0,
            keepalive_timeout=30,
            enable_cleanup_closed=False,
            force_close=False,
            use_dns_cache=True,
            ttl_dns_cache=10,
        )
        self._ws_timeout = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5)
        self._pool = LeanPool(
            self.base,
            limit=settings.max_connections,
            connect_timeout_s=settings.connect_timeout_s,
            timeout_s=settings.timeout_s,
        )
        # WebSockets only: the HTTP leg goes through the lean pool
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING),
            timeout=aiohttp.ClientTimeout(
                total=settings.timeout_s, connect=settings.connect_timeout_s
            ),
            requote_redirect_url=False,
            trust_env=False,
        )

    @property
    def host_header(self) -> str:
        return self._pool.host_header

    def url(self, raw_path_qs: str) -> URL:
        return URL(self.settings.url + raw_path_qs, encoded=True)

    def send(
        self,
        method: str,
        raw_path_qs: str,
        headers: str | Sequence[tuple[str, str]],
        body: AsyncIterator[bytes] | list[bytes] | None,
        *,
        has_length: bool = False,
    ) -> Coroutine[Any, Any, LeanResponse]:
        r"""Send a request (await it); :class:`UpstreamError` if no response head came back.

        ``headers``: ``Name: value\r\n`` lines, or (name, value) pairs.

        Not a coroutine itself: one level less for every resumption of the request.
        """
        chunked = body is not None and not has_length
        return self._pool.request(method, raw_path_qs, headers, body, chunked=chunked)

    async def ws_connect(
        self,
        raw_path_qs: str,
        headers: list[tuple[str, str]],
        protocols: Iterable[str],
        *,
        max_msg_size: int,
    ) -> aiohttp.ClientWebSocketResponse:
        with _upstream_errors():
            return await self._session.ws_connect(
                self.url(raw_path_qs),
                headers=CIMultiDict(headers),
                protocols=tuple(protocols),
                timeout=self._ws_timeout,
                autoclose=False,
                autoping=False,
                max_msg_size=max_msg_size,
                compress=0,
            )

    async def close(self) -> None:
        await self._pool.close()
        await self._session.close()


async def pump_ws(
    src: aiohttp.ClientWebSocketResponse | aiohttp.web.WebSocketResponse,
    dst: aiohttp.ClientWebSocketResponse | aiohttp.web.WebSocketResponse,
) -> None:
    """Copy WebSocket messages from ``src`` to ``dst`` until either side closes."""
    async for msg in src:
        if dst.closed:
            break
        if msg.type is aiohttp.WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is aiohttp.WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is aiohttp.WSMsgType.PONG:
            await dst.pong(msg.data)
        else:
            break
    if not dst.closed:
        code = src.close_code or aiohttp.WSCloseCode.OK
        await dst.close(code=code)


async def splice_ws(
    client: aiohttp.web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Run both directions until one ends, then close the other."""
    a = asyncio.ensure_future(pump_ws(client, upstream))
    b = asyncio.ensure_future(pump_ws(upstream, client))
    try:
        await asyncio.wait((a, b), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (a, b):
            if not t.done():
                t.cancel()
        await asyncio.gather(a, b, return_exceptions=True)
        if not upstream.closed:
            await upstream.close()
