"""The client's address behind trusted proxies.

The peer's own address is the client unless the peer is a trusted proxy; then the
``X-Forwarded-For`` chain is walked from the right, skipping trusted proxies, and
the right-most untrusted address is the client (a client can prepend anything to
the chain, but cannot forge what a trusted proxy appended).  The networks are
parsed once with aiohttp-remotes' parser; its middlewares are not used on the hot
path because ``XForwardedFiltered`` believes the header from any peer and both
clone the request for every call.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping

from aiohttp import hdrs
from aiohttp_remotes.utils import parse_trusted_element

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(text: str) -> IPAddress | None:
    """An address from text; IPv4-mapped IPv6 becomes IPv4; None if invalid."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        # "[::1]" or "1.2.3.4:5678" forms some proxies write
        t = text.strip()
        if t.startswith("["):
            t = t[1 : t.find("]")] if "]" in t else t
        elif t.count(":") == 1:
            t = t.split(":", 1)[0]
        else:
            return None
        try:
            ip = ipaddress.ip_address(t)
        except ValueError:
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Networks:
    """A set of CIDRs with a membership test (parsed once)."""

    __slots__ = ("_nets4", "_nets6", "empty")

    def __init__(self, cidrs: Iterable[str | IPNetwork]) -> None:
        nets = [
            n if isinstance(n, IPNetwork) else ipaddress.ip_network(n)
            for n in parse_trusted_element([str(c) for c in cidrs])
        ]
        self._nets4 = tuple(n for n in nets if n.version == 4)
        self._nets6 = tuple(n for n in nets if n.version == 6)
        # read on every request (trusted proxies): an attribute, not __bool__'s call
        self.empty = not (self._nets4 or self._nets6)

    def __bool__(self) -> bool:
        return not self.empty

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, ipaddress.IPv4Address):
            return any(ip in n for n in self._nets4)
        if isinstance(ip, ipaddress.IPv6Address):
            return any(ip in n for n in self._nets6)
        return False


def resolve_client(
    peer: IPAddress | None, forwarded_for: str | None, trusted: Networks
) -> tuple[IPAddress | None, bool]:
    """Return (client address, whether the peer is a trusted proxy)."""
    if peer is None or trusted.empty or peer not in trusted:
        return peer, False
    if not forwarded_for:
        return peer, True
    client = peer
    for part in reversed(forwarded_for.split(",")):
        ip = parse_ip(part)
        if ip is None:
            # Unparseable hop: stop at the last address a trusted hop vouched for.
            break
        client = ip
        if ip not in trusted:
            break
    return client, True


def forwarded_values(value: str, param: str) -> list[str]:
    """The ``param`` values of an RFC 7239 ``Forwarded`` header, in order (``for``,
    ``proto``, ``host``); quotes removed, addresses left as written (``[v6]:port``)."""
    out = []
    for element in value.split(","):
        for pair in element.split(";"):
            key, sep, v = pair.strip().partition("=")
            if sep and key.strip().lower() == param:
                out.append(v.strip().strip('"'))
    return out


def forwarded_proto(headers: Mapping[str, str]) -> str:
    """The scheme a trusted proxy says the client used ("" when it says nothing)."""
    p = headers.get(hdrs.X_FORWARDED_PROTO)
    if p:
        return str(p).split(",", 1)[0].strip().lower()
    if hdrs.FORWARDED in headers:
        protos = forwarded_values(headers[hdrs.FORWARDED], "proto")
        if protos:
            return protos[0].lower()
    return ""


def forwarded_chain(
    xff: str | None, peer: IPAddress | None, trusted: Networks, client_ip: str
) -> str:
    """The X-Forwarded-For sent upstream: the client, the trusted hops after it, the peer."""
    hops: list[str] = []
    if xff:
        for part in reversed(xff.split(",")):
            ip = parse_ip(part)
            if ip is None:
                break
            hops.append(str(ip))
            if ip not in trusted:
                break
    hops.reverse()
    if peer is not None:
        hops.append(str(peer))
    return ", ".join(hops) if hops else client_ip


def peer_of(transport: asyncio.BaseTransport | None) -> tuple[IPAddress | None, str]:
    """The peer address of a connection and its text ("-" when unknown)."""
    info = transport.get_extra_info("peername") if transport is not None else None
    ip = parse_ip(info[0]) if info else None
    return ip, str(ip) if ip is not None else "-"
