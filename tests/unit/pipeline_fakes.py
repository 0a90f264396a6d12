"""A request satisfying :class:`~gateway.pipeline.request.PipelineRequest` without a socket,
and a runtime built from a config, for the pipeline's steps in unit tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml
from multidict import CIMultiDict, MultiDict, MultiDictProxy
from yarl import URL

from gateway.config import load_text
from gateway.core.client_ip import parse_ip
from gateway.core.framing import FramingError, request_host
from gateway.downstream.messages import Response
from gateway.runtime import Runtime

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Iterable, Mapping

    from aiohttp import web

    from gateway.core.client_ip import IPAddress
    from gateway.downstream.live import AnswerHeaders
    from gateway.downstream.messages import Body


class _Reader:
    def __init__(self, body: bytes) -> None:
        self._chunks = [body] if body else []

    async def readany(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


class FakeRequest:
    """A request as the pipeline reads it; what is answered by streaming is kept."""

    fields_decoded = False

    def __init__(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Iterable[tuple[str, str]] = (("Host", "example.com"),),
        *,
        peer: str = "10.1.2.3",
        body: bytes = b"",
    ) -> None:
        self.method = method
        self.raw_path = target
        self.path = target.partition("?")[0]
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self.header_bytes = sum(len(k) + len(v) + 4 for k, v in self.headers.items())
        cl = self.headers.get("Content-Length")
        self.content_length = int(cl) if cl is not None else None
        self.body_exists = bool(self.content_length)
        self.content = _Reader(body)
        self.transport: asyncio.Transport | None = None
        self.rid: str | None = None
        self.response_headers: AnswerHeaders | None = None
        self.https = False
        self.extra_headers: list[tuple[str, str]] | None = None
        self.pending_record: object | None = None
        self._peer = parse_ip(peer)
        self.streamed: list[bytes] = []

    @property
    def header_fields(self) -> list[tuple[str, str]]:
        return list(self.headers.items())

    @property
    def rel_url(self) -> URL:
        if self.raw_path.startswith("/"):
            return URL(self.raw_path, encoded=True)
        return URL(self.raw_path, encoded=True).relative()

    @property
    def query(self) -> MultiDictProxy[str]:
        return MultiDictProxy(MultiDict(self.rel_url.query))

    def peer_address(self) -> tuple[IPAddress | None, str]:
        return self._peer, str(self._peer) if self._peer is not None else "-"

    def target_host(self) -> str | None:
        try:
            return request_host("1.1", self.headers.getall("Host", []), self.raw_path)
        except FramingError:
            return None

    def lean_body(self) -> Body | None:
        return None

    def websocket_request(self) -> web.BaseRequest | None:
        return None

    async def send_continue(self) -> None:
        return None

    async def start_stream(
        self, status: int, reason: str | None, headers: list[tuple[str, str]]
    ) -> Response:
        return Response(status, reason, headers, None)

    async def write(self, data: bytes) -> None:
        self.streamed.append(data)

    async def write_eof(self) -> None:
        return None


def runtime_of(cfg: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Runtime:
    """A runtime from a config (not started: nothing listens, nothing is probed)."""
    data = {
        "listen": {"host": "127.0.0.1", "port": 1},
        "admin": {"host": "127.0.0.1", "port": 2},
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        **cfg,
    }
    return Runtime(load_text(yaml.safe_dump(data), environ=dict(env or {})))
