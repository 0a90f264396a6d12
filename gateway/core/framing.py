"""RFC 9112 request framing rules the parser leaves to its user (pure, no I/O).

llhttp checks the syntax of a request head; what the host of a request is and which
transfer codings it may use are decided here, once per request:

* :func:`parse_host` reads a Host field value (or an absolute-form target's authority):
  ``uri-host [":" port]`` with the host lower-cased, one trailing dot removed, and an
  IPv6 literal (``[::1]``) in its compressed form without brackets. Host names are
  letters, digits, ``-``, ``.``, ``_`` and ``~`` (no percent-encoding and no
  sub-delimiters: a ``,`` in a Host value is how one field is made to look like two);
* :func:`request_host` applies RFC 9112 3.2 to a request: an HTTP/1.1 request has
  exactly one valid Host, any request at most one, and an absolute-form target's
  authority must name the same host and port as the Host field (the gateway refuses
  the disagreement rather than pick a side a front proxy may not have picked);
* :func:`check_transfer_coding` accepts ``chunked`` alone (RFC 9112 6.1, 6.3): a coding
  list where ``chunked`` is not last, or is applied twice, is 400; any other coding
  (``gzip``, ``identity``, ``x-custom``) is 501, as the gateway implements none.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "FramingError",
    "check_transfer_coding",
    "parse_host",
    "parse_host_entry",
    "request_host",
    "target_authority",
]

# lower-cased reg-name: labels of unreserved characters, no empty label
_REG_NAME = re.compile(r"[a-z0-9_~-]+(?:\.[a-z0-9_~-]+)*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # RFC 9110 5.6.2, lower-cased
_MAX_PORT = 65535
_DEFAULT_PORTS = {"http": 80, "https": 443}


class FramingError(Exception):
    """The request breaks a framing rule: answer ``status`` and close the connection."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_BAD_PORT = -1


def _port(rest: str) -> int | None:
    """``rest`` (what follows the host: "" or ":digits") as a port, None when absent or
    empty (RFC 3986 3.2.3), ``_BAD_PORT`` when it is not a port."""
    if not rest:
        return None
    digits = rest[1:]
    if rest[0] != ":":
        return _BAD_PORT
    if not digits:
        return None
    if len(digits) > len(str(_MAX_PORT)) or not (digits.isascii() and digits.isdigit()):
        return _BAD_PORT
    port = int(digits)
    return port if port <= _MAX_PORT else _BAD_PORT


def parse_host(value: str) -> tuple[str, int | None] | None:
    """``value`` as (host, port), or None when it is not ``uri-host [":" port]``."""
    if not value:
        return None
    if value[0] == "[":
        end = value.find("]")
        literal = value[1:end]
        # no zone id (RFC 6874 is for browsers' address bars, not Host fields)
        if end < 0 or not literal or "%" in literal:
            return None
        try:
            host = ipaddress.IPv6Address(literal).compressed
        except ValueError:  # IPvFuture and anything else
            return None
        rest = value[end + 1 :]
    else:
        host, sep, rest = value.partition(":")
        rest = sep + rest
        host = host.lower()
        if host[-1:] == ".":
            host = host[:-1]  # the root label: "example.com." is "example.com"
        if not _REG_NAME.fullmatch(host):
            return None
    port = _port(rest)
    if port == _BAD_PORT:
        return None
    return host, port


def parse_host_entry(entry: str) -> str:
    """An ``allowed_hosts`` entry in the form :func:`parse_host` gives; a bare IPv6
    address (``::1``) is accepted too. ValueError when it is not a host or has a port."""
    text = entry.strip()
    if ":" in text and not text.startswith("["):
        try:
            return ipaddress.IPv6Address(text).compressed
        except ValueError:
            pass
    parsed = parse_host(text)
    if parsed is None or text.endswith(":"):
        msg = "not a host name or an IP address"
        raise ValueError(msg)
    if parsed[1] is not None:
        msg = "no port here: Host fields are compared without their port"
        raise ValueError(msg)
    return parsed[0]


def target_authority(target: str) -> tuple[str, str] | None:
    """(scheme, authority) of an absolute-form target, lower-cased scheme; None for the
    other forms (origin ``/p``, asterisk ``*``, authority ``host:port``)."""
    if target[:1] == "/":
        return None
    scheme, sep, rest = target.partition("://")
    if not sep:
        return None
    end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if 0 <= i < end:
            end = i
    return scheme.lower(), rest[:end]


def request_host(version: str, hosts: Sequence[str], target: str) -> str | None:
    """The host a request is for (as :func:`parse_host` gives it, without the port), or
    None for an HTTP/1.0 request that names none. Raises :class:`FramingError` (400)."""
    if len(hosts) > 1:
        raise FramingError(400, "more than one Host header field")
    parsed = None
    if hosts:
        parsed = parse_host(hosts[0])
        if parsed is None:
            raise FramingError(400, "the Host header is not a valid host")
    elif version != "1.0":
        raise FramingError(400, "an HTTP/1.1 request needs a Host header")
    form = target_authority(target)
    if form is None:
        return parsed[0] if parsed is not None else None
    scheme, authority = form
    default = _DEFAULT_PORTS.get(scheme)
    if default is None:
        raise FramingError(400, "the request target's scheme is not http or https")
    named = parse_host(authority) if "@" not in authority else None
    if named is None:
        raise FramingError(400, "the request target's authority is not a valid host")
    if parsed is not None and (parsed[0], parsed[1] or default) != (named[0], named[1] or default):
        raise FramingError(400, "the Host header differs from the request target's authority")
    return named[0]


def check_transfer_coding(values: Iterable[str]) -> None:
    """Raise :class:`FramingError` unless the Transfer-Encoding field lines ``values``
    (combined as one list; empty members ignored, RFC 9110 5.6.1) say ``chunked`` alone."""
    codings = [m.strip(" \t").lower() for v in values for m in v.split(",")]
    codings = [c for c in codings if c]
    if not codings:
        raise FramingError(400, "Transfer-Encoding names no coding")
    names = [c.partition(";")[0].rstrip(" \t") for c in codings]
    if not all(_TOKEN.fullmatch(n) for n in names):
        raise FramingError(400, "Transfer-Encoding is malformed")
    chunked = names.count("chunked")
    if chunked > 1:
        raise FramingError(400, "the chunked transfer coding is applied more than once")
    if chunked and names[-1] != "chunked":
        raise FramingError(400, "the chunked transfer coding is not the last one")
    if chunked and codings[-1] != "chunked":
        raise FramingError(400, "the chunked transfer coding takes no parameters")
    if len(names) > 1 or names[0] != "chunked":
        other = next(n for n in names if n != "chunked")
        raise FramingError(501, f"the transfer coding {other!r} is not implemented")
