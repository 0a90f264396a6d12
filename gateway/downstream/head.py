"""Reading a request head within its bounds: the parser callbacks that gather it.

llhttp (through ``httptools``) calls these as it parses; they collect the request target
and header fields, and bound them: the target and the fields by ``max_header_bytes``,
the fields by count (256), the bytes read while in a head by twice the bound and some
slack (whitespace and line folding that are not in the fields), and what a chunked body
carries besides its data (chunk lines, trailer fields, which the parser gathers before
any callback). A breach raises :class:`HeadTooLarge` out of the parser, answered as 431.

The host a request is for is read once its head is in (:class:`HostCache`), by the rules
of :mod:`gateway.core.framing`; a breach raises ``FramingError`` out of the parser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import httptools
from multidict import istr

from gateway.core.fieldnames import NameTable
from gateway.core.framing import request_host

if TYPE_CHECKING:
    from multidict import CIMultiDict

__all__ = ["MAX_FIELDS", "HeadReader", "HeadTooLarge", "HostCache"]

MAX_FIELDS: Final = 256
_HOST_CACHE_MAX = 1024  # distinct Host values remembered with their parse (a few in practice)
_READ_MAX: Final = 256 * 1024  # the most one read delivers (uvloop's buffer)
# the fields of no head: shared, never appended to (each head gets its own list)
_NO_FIELDS: Final[list[tuple[str, str]]] = []
_HOST: Final = istr("Host")  # (an istr is not case-folded again on every lookup)
_NAMES: Final = NameTable()  # the field names of the requests of every connection


class HeadTooLarge(Exception):  # noqa: N818 - a signal out of a parser callback
    """The request head is over its bounds."""


class HostCache:
    """The host of each Host value an origin-form request came with: a client sends the
    same few values, parsed once each (a value that is refused is not remembered)."""

    __slots__ = ("_hosts",)

    def __init__(self) -> None:
        self._hosts: dict[str, str] = {}

    def host_of(self, version: str, headers: CIMultiDict[str], target: str) -> str | None:
        """:func:`gateway.core.framing.request_host` of a request head (lower-case, no
        port or trailing dot, IPv6 unbracketed); raises ``FramingError``."""
        hosts = headers.getall(_HOST, ())
        if len(hosts) != 1 or target[:1] != "/":
            return request_host(version, hosts, target)
        # the usual request (with a Host field it has a host: "" is never one)
        host = self._hosts.get(hosts[0])
        if host:
            return host
        host = request_host(version, hosts, target) or ""  # (one Host: never None)
        if len(self._hosts) >= _HOST_CACHE_MAX:
            self._hosts.clear()
        self._hosts[hosts[0]] = host
        return host


class HeadReader:
    """The head-gathering half of a connection (the base of its protocol).

    The parser is made when the first bytes arrive (:meth:`_parser_now`) and dropped
    with the last head's fields while the connection is idle (:meth:`_shed`): an idle
    connection holds neither, and the parser's bound callbacks (a reference cycle with
    this object) do not outlive the connection.
    """

    __slots__ = (
        "_chunked",
        "_chunks",
        "_fields",
        "_framing",
        "_head_bytes",
        "_head_size",
        "_in_head",
        "_max_head",
        "_parse_failure",
        "_parser",
        "_url",
    )

    def __init__(self, max_header_bytes: int) -> None:
        self._max_head = max_header_bytes
        self._parser: httptools.HttpRequestParser | None = None
        self._parse_failure: Exception | None = None
        self._url = b""
        self._fields = _NO_FIELDS
        self._head_bytes = 0  # bytes read while in the head, whitespace included
        self._head_size = 0  # the fields' size as they are kept
        self._in_head = False
        # a chunked body: bytes read that were not body (chunk lines, trailer fields)
        self._chunked = False
        self._chunks = 0
        self._framing = 0

    def _parser_now(self) -> httptools.HttpRequestParser:
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        return parser

    def _failing(self, exc: Exception) -> Exception:
        """``exc``, raised out of a parser callback, kept as the parser error's cause
        (:meth:`_take_failure`). llhttp turns it into an error of its own; the implicit
        chaining that would carry it along is not relied on: a compiled build can leave
        another, already handled exception current there."""
        self._parse_failure = exc
        return exc

    def _take_failure(self) -> Exception | None:
        """What a callback raised to stop the parser (None: llhttp's own error)."""
        exc = self._parse_failure
        self._parse_failure = None
        return exc

    def _shed(self) -> None:
        """Drop the parser and the last head (only between messages: the next bytes
        start a new one, which a new parser reads as the old one would)."""
        self._parser = None
        self._url = b""
        self._fields = _NO_FIELDS

    def on_message_begin(self) -> None:
        self._chunked = False
        self._chunks = 0
        self._framing = 0
        self._in_head = True
        self._url = b""
        self._fields = []
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_head:
            raise self._failing(HeadTooLarge())

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # a trailer field (the parser calls this for those too): dropped. The head's
            # list is the request's, passed on upstream, and every check was made
            # before the trailer came (its bytes are bounded with the chunk lines)
            return
        fields = self._fields
        fields.append((_NAMES.name(name, len(fields)), value.decode("latin-1")))
        self._head_size += len(name) + len(value) + 4
        if len(fields) > MAX_FIELDS:
            raise self._failing(HeadTooLarge())

    def on_chunk_header(self) -> None:
        self._chunked = True
        self._chunks += 1

    def _head_over(self) -> bool:
        """Whether the bytes read in this head are past any head within the bound."""
        return self._head_bytes > 2 * self._max_head + 8192

    def _framing_over(self, data: bytes) -> bool:
        """Whether a chunked body carries too much besides its data. Trailer fields are
        gathered by the parser before any callback, so they are bounded here: the head,
        chunk lines and one read's worth of slack. Called while ``_chunked``."""
        self._framing += len(data)
        return self._framing > 2 * self._max_head + 64 * self._chunks + _READ_MAX

    def _raw_head(self) -> bytes:
        """The head again as it came, for the protocol an upgrade is handed to (latin-1
        gives back the very bytes)."""
        parser = self._parser_now()  # (in a head: it exists)
        lines = [
            parser.get_method() + b" " + self._url + b" HTTP/" + parser.get_http_version().encode()
        ]
        lines.extend(f"{n}: {v}".encode("latin-1") for n, v in self._fields)
        return b"\r\n".join(lines) + b"\r\n\r\n"
