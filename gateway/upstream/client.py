"""The upstream leg: one keep-alive pool per upstream, streaming both ways.

Everything the request pipeline needs from an upstream goes through
:class:`UpstreamClient`, so a leaner client can replace the aiohttp one without
touching the pipeline.  The header rules are :mod:`gateway.upstream.hop_by_hop`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict
from yarl import URL

from gateway.upstream.pool import (
    HEAD_TOO_LARGE,
    MAX_RESPONSE_FIELDS,
    LeanPool,
    LeanResponse,
    UpstreamError,
)

if TYPE_CHECKING:
    from gateway.config import Upstream


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """The part of an upstream's config that shapes its pool (a change rebuilds it)."""

    url: str
    connect_timeout_s: float
    timeout_s: float
    max_connections: int
    max_response_header_bytes: int

    @classmethod
    def of(cls, cfg: Upstream) -> UpstreamSettings:
        return cls(
            cfg.url,
            cfg.connect_timeout_s,
            cfg.timeout_s,
            cfg.max_connections,
            cfg.max_response_header_bytes,
        )


# what aiohttp's parser says of a head over the limits it was given (its exception
# types are not kept by the client: only the message is)
_OVER_LIMITS = ("Too many headers", "Got more than")


def _bounded_response(max_head: int) -> type[aiohttp.ClientResponse]:
    """A response class for aiohttp's client that refuses a head over ``max_head`` bytes
    in all (the parser bounds each line and the number of fields, not their sum)."""

    class BoundedResponse(aiohttp.ClientResponse):
        async def start(self, connection: aiohttp.connector.Connection) -> Self:
            await super().start(connection)
            size = len(self.reason or "") + 15
            size += sum(len(k) + len(v) + 4 for k, v in self.raw_headers)
            if size > max_head:
                msg = f"response head over {max_head} bytes"
                raise UpstreamError(HEAD_TOO_LARGE, msg, sent=True)
            return self

    return BoundedResponse


@contextlib.contextmanager
def _upstream_errors() -> Iterator[None]:
    """Map the client's exceptions to :class:`UpstreamError` kinds (an upstream's refusal
    of a WebSocket upgrade is its answer, not an error: it passes through as it is)."""
    try:
        yield
    except aiohttp.WSServerHandshakeError:
        raise
    except aiohttp.ClientResponseError as exc:
        if any(m in exc.message for m in _OVER_LIMITS):
            raise UpstreamError(HEAD_TOO_LARGE, "response head over the limits", sent=True) from exc
        raise UpstreamError("protocol", "malformed upstream response", sent=True) from exc
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
            max_head_bytes=settings.max_response_header_bytes,
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
            # the handshake's answer is bounded like any other (its own bytes never reach
            # the client either way)
            response_class=_bounded_response(settings.max_response_header_bytes),
            max_line_size=settings.max_response_header_bytes,
            max_field_size=settings.max_response_header_bytes,
            max_headers=MAX_RESPONSE_FIELDS,
        )

    @property
    def host_header(self) -> str:
        return self._pool.host_header

    @property
    def pool(self) -> LeanPool:
        """The HTTP leg's pool (:meth:`send` without this class's frame: the request path
        calls it directly)."""
        return self._pool

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
