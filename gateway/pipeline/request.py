"""What the pipeline needs of a request: the seam between the servers and the pipeline.

Two servers hand requests to the pipeline: the proxy port's own HTTP/1.1 server
(:class:`gateway.downstream.messages.Request`) and aiohttp's, which takes upgrades
(:class:`gateway.downstream.upgrade.GatewayRequest`). Both satisfy
:class:`PipelineRequest`, and the pipeline reads nothing else of them, so a step can be
driven by any object that does (a test's fake included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Sequence

    from aiohttp import web
    from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
    from yarl import URL

    from gateway.core.client_ip import IPAddress
    from gateway.downstream.live import AnswerHeaders
    from gateway.downstream.messages import Body, Request, Response


class BodyReader(Protocol):
    """A request body read as it arrives; ``b""`` once it is all read."""

    async def readany(self) -> bytes: ...


class PipelineRequest(Protocol):
    """One request as the pipeline sees it, and the means to answer it."""

    # the gateway's per-request state, set by the pipeline, read when answering
    rid: str | None
    response_headers: AnswerHeaders | None  # the snapshot's ResponseHeaders
    https: bool
    extra_headers: list[tuple[str, str]] | None
    # what the pipeline keeps to record the request (metrics, access log) once the server
    # has written its answer: handed back through the server's ``finished`` hook
    pending_record: object | None

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str:
        """The decoded path (probes and the access log read it)."""
        ...

    @property
    def raw_path(self) -> str:
        """The request target as sent (origin form, or absolute form)."""
        ...

    @property
    def rel_url(self) -> URL: ...

    @property
    def query(self) -> MultiMapping[str]: ...

    @property
    def headers(self) -> CIMultiDict[str] | CIMultiDictProxy[str]: ...

    @property
    def header_fields(self) -> Sequence[tuple[str, str]]:
        """The header fields in the order they came, as ``headers`` holds them (a walk
        over all of them costs less here than over the multidict)."""
        ...

    @property
    def fields_decoded(self) -> bool:
        """Field values were decoded as UTF-8 (aiohttp's), not kept as sent (latin-1)."""
        ...

    @property
    def header_bytes(self) -> int: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body_exists(self) -> bool: ...

    @property
    def content(self) -> BodyReader: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def peer_address(self) -> tuple[IPAddress | None, str]:
        """The peer's address (None when not an IP) and its text."""
        ...

    def target_host(self) -> str | None:
        """The host the request is for, as the framing rules read it; None if unreadable."""
        ...

    def lean_body(self) -> Body | None:
        """The proxy port's own body buffer (read without joined copies), else None."""
        ...

    def websocket_request(self) -> web.BaseRequest | None:
        """The aiohttp request a WebSocket handshake is prepared on; None where upgrades
        are not served (the proxy port's own server hands them over first)."""
        ...

    async def send_continue(self) -> None: ...

    async def start_stream(
        self, status: int, reason: str | None, headers: list[tuple[str, str]]
    ) -> Response: ...

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...


# What the pipeline's steps take: the proxy port's own request named beside the Protocol.
# The types are alike; the compiled build reads the fields of a ``Request`` directly (a
# type check, then the field), and those of any other request by name, as before.
AnyRequest: TypeAlias = "Request | PipelineRequest"
