"""What the proxy port's servers read of the current configuration, where a request starts.

The servers do not copy reloadable values: they ask for the current snapshot when a
request head starts (its deadline), when a client stops reading (its idle bound) and when
they write an answer of their own (the request id field and the security headers), so a
reload reaches them with no listener. :class:`Fixed` stands for the snapshot where no
runtime runs (tests, benchmarks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from multidict import CIMultiDict

__all__ = ["AnswerHeaders", "Fixed", "Live", "StaticHeaders"]


class StaticHeaders(Protocol):
    def static_block(self) -> str:
        """The security headers as ready ``Name: value\\r\\n`` lines."""
        ...


class AnswerHeaders(StaticHeaders, Protocol):
    """The fields every answer gets (the request id, the security headers), as the
    current snapshot renders them (:class:`gateway.pipeline.headers.ResponseHeaders`)."""

    def render(
        self,
        headers: list[tuple[str, str]],
        rid: str | None,
        *,
        secure: bool,
        extra: list[tuple[str, str]] | None = None,
        skip: frozenset[str] | None = None,
    ) -> tuple[str, bool]:
        """The header block of an answer, and whether a Date field is among it."""
        ...

    def apply(self, headers: CIMultiDict[str], rid: str | None, *, secure: bool) -> None:
        """The same, on aiohttp's headers of an answer, in place."""
        ...


class Live(Protocol):
    """The part of :class:`gateway.pipeline.snapshot.Snapshot` the servers read."""

    @property
    def client_timeout_s(self) -> float: ...
    @property
    def body_idle_s(self) -> float: ...
    @property
    def rid_header(self) -> str: ...
    @property
    def response_headers(self) -> StaticHeaders: ...


class Fixed:
    """Values that do not follow a runtime (a server made on its own)."""

    __slots__ = ("_static", "body_idle_s", "client_timeout_s", "rid_header")

    def __init__(
        self, *, client_timeout_s: float, body_idle_s: float, rid_header: str, static_headers: str
    ) -> None:
        self.client_timeout_s = client_timeout_s
        self.body_idle_s = body_idle_s
        self.rid_header = rid_header
        self._static = static_headers

    @property
    def response_headers(self) -> Fixed:
        return self

    def static_block(self) -> str:
        return self._static
