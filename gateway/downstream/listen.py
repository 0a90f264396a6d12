"""Listening sockets: ``host: "::"`` is dual stack (IPv4 and IPv6), as operators expect.

asyncio binds an IPv6 socket with ``IPV6_V6ONLY`` set, so ``"::"`` alone would refuse
IPv4 clients (NGINX's ``listen [::]:80 ipv6only=off`` and Envoy's ``ipv4_compat`` are the
same choice made explicit).  The any-address socket is made here with the option off; an
IPv4 client then arrives as ``::ffff:a.b.c.d``, which the client-address parsing reads
back as the IPv4 address (its limits, bans and logs are those of an IPv4 client).
"""

from __future__ import annotations

import ipaddress
import socket

_ANY6 = ipaddress.IPv6Address("::")


def is_any_ipv6(host: str) -> bool:
    """True for the IPv6 any-address (``::``, in any spelling)."""
    try:
        return ipaddress.ip_address(host) == _ANY6
    except ValueError:
        return False


def dual_stack_socket(port: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``[::]:port`` that accepts IPv4 too."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)  # noqa: FBT003 - the socket API
    except OSError:
        sock.close()
        raise
    return sock
