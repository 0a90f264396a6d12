"""Break-glass allow entries: which client addresses are exempt from bans and rate limits
for a while (SPEC section 12), the pure part: what an entry may name, and the lookup.

What an entry names
    An IPv4 address; an IPv6 address, which means its prefix of
    ``rate_limit.ipv6_prefix`` bits (the key its bans and limits are kept under, so the
    exemption covers what the ban covered); or an IPv6 prefix written as CIDR, at least
    :data:`MIN_IPV6_PREFIX` bits long.  Wider exemptions (IPv4 networks, short IPv6
    prefixes) belong in ``allow_cidrs``, where they are reviewed with the config: a
    break-glass entry is made with one token and one request.

Lookup
    Entries are kept by ``(version, network as an int, prefix length)``; a lookup masks
    the address once per prefix length in use (usually one or two), so its cost does not
    grow with the number of entries.  An expired entry never matches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.core.client_ip import IPAddress

__all__ = [
    "MAX_REASON_CHARS",
    "MAX_TTL_S",
    "MIN_IPV6_PREFIX",
    "AllowEntry",
    "AllowTable",
    "EntryError",
    "check_request",
    "entry_name",
    "parse_target",
]

MIN_IPV6_PREFIX = 32
"""The widest IPv6 prefix an entry may name (a /32 is a whole provider's allocation)."""

MAX_TTL_S = 7 * 86400
"""The longest an entry lasts: a week; an exemption meant to stay belongs in the config."""

MAX_REASON_CHARS = 200

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_Key = tuple[int, int, int]  # version, network as an int, prefix length


class EntryError(ValueError):
    """An entry that may not be made; ``field`` names what is wrong in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_target(text: str, ipv6_prefix: int, *, field: str = "ip") -> IPNetwork:
    """The network an entry (or a removal) names; :class:`EntryError` if none.

    An IPv6 address means its ``ipv6_prefix`` prefix; a prefix is normalised (host bits
    cleared), so ``2001:db8::1/64`` and ``2001:db8::/64`` are one entry."""
    text = text.strip()
    if not text or len(text) > 64:
        raise EntryError(field, "an IP address or an IPv6 prefix (CIDR) is required")
    try:
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
            # rebuilt from its number: a zone id (``%eth0``) would stay in its name, one
            # network under two names in the shared list
            net = ipaddress.ip_network((int(net.network_address), net.prefixlen))
        else:
            ip = ipaddress.ip_address(text)
            mapped = ip.version == 6 and ip.ipv4_mapped is not None
            bits = ipv6_prefix if ip.version == 6 and not mapped else ip.max_prefixlen
            net = ipaddress.ip_network((int(ip), bits), strict=False)
    except ValueError:
        raise EntryError(field, f"{text!r} is not an IP address or prefix") from None
    if net.version == 6 and net.subnet_of(_IPV4_MAPPED):
        # Client addresses (and so bans) turn ::ffff:a.b.c.d into a.b.c.d: an entry does
        # too, or it would name ::/64 and leave the IPv4 client banned.
        if net.prefixlen != 128:
            raise EntryError(field, "an IPv4-mapped entry is one address")
        net = ipaddress.ip_network((int(net.network_address) & 0xFFFFFFFF, 32))
    if net.version == 4 and net.prefixlen != 32:
        raise EntryError(field, "an IPv4 entry is one address (use allow_cidrs for networks)")
    if net.version == 6 and net.prefixlen < MIN_IPV6_PREFIX:
        raise EntryError(field, f"an IPv6 prefix must be at least /{MIN_IPV6_PREFIX}")
    return net


def check_request(body: Any, ipv6_prefix: int) -> tuple[IPNetwork, float, str]:
    """The network, TTL and reason of a ``POST /admin/allow`` body (parsed JSON);
    :class:`EntryError` naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise EntryError("body", 'a JSON object {"ip", "ttl_s", "reason"} is required')
    unknown = sorted(set(body) - {"ip", "ttl_s", "reason"})
    if unknown:
        raise EntryError(str(unknown[0]), "unknown field (expected ip, ttl_s, reason)")
    ip = body.get("ip")
    if not isinstance(ip, str):
        raise EntryError("ip", "an IP address or an IPv6 prefix (CIDR) is required")
    net = parse_target(ip, ipv6_prefix)
    ttl = body.get("ttl_s")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= MAX_TTL_S:
        raise EntryError("ttl_s", f"a number of seconds from 1 to {MAX_TTL_S} is required")
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise EntryError("reason", "a reason is required (who asked, which ticket)")
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise EntryError(
            "reason", f"at most {MAX_REASON_CHARS} printable characters, no line breaks"
        )
    return net, float(ttl), reason.strip()


def entry_name(net: IPNetwork) -> str:
    """How an entry is listed and stored: an IPv4 address bare, an IPv6 prefix as CIDR."""
    return str(net.network_address) if net.version == 4 else str(net)


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One exemption: its network's name (:func:`entry_name`), when it ends and why."""

    ip: str
    expires_at: float  # unix time
    reason: str
    created_at: float
    by: str  # who made it: the admin caller's address

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "reason": self.reason,
            "created_at": round(self.created_at, 3),
            "expires_at": round(self.expires_at, 3),
            "expires_in_s": max(0.0, round(self.expires_at - now, 3)),
            "by": self.by,
        }

    def record(self) -> dict[str, Any]:
        """The stored form (without ``ip``, the key it is stored under)."""
        return {
            "expires_at": self.expires_at,
            "reason": self.reason,
            "created_at": self.created_at,
            "by": self.by,
        }

    @classmethod
    def from_record(cls, ip: str, r: Any) -> AllowEntry | None:
        try:
            return cls(
                ip, float(r["expires_at"]), str(r["reason"]), float(r["created_at"]), str(r["by"])
            )
        except (KeyError, TypeError, ValueError):
            return None


def _key(net: IPNetwork) -> _Key:
    return net.version, int(net.network_address), net.prefixlen


class AllowTable:
    """The entries in force, looked up by client address."""

    __slots__ = ("_entries", "_lengths")

    def __init__(self, entries: Iterable[AllowEntry] = ()) -> None:
        self._entries: dict[_Key, AllowEntry] = {}
        self._lengths: dict[int, tuple[int, ...]] = {4: (), 6: ()}
        for entry in entries:
            self.put(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def put(self, entry: AllowEntry) -> None:
        """Add or replace the entry of ``entry.ip`` (a name of :func:`entry_name`)."""
        net = ipaddress.ip_network(entry.ip, strict=False)
        key = _key(net)
        self._entries[key] = entry
        lengths = self._lengths[net.version]
        if net.prefixlen not in lengths:
            self._lengths[net.version] = tuple(sorted({*lengths, net.prefixlen}, reverse=True))

    def remove(self, net: IPNetwork) -> AllowEntry | None:
        entry = self._entries.pop(_key(net), None)
        if entry is not None:
            self._relength()
        return entry

    def _relength(self) -> None:
        lengths: dict[int, set[int]] = {4: set(), 6: set()}
        for version, _, length in self._entries:
            lengths[version].add(length)
        self._lengths = {v: tuple(sorted(ls, reverse=True)) for v, ls in lengths.items()}

    def match(self, ip: IPAddress, now: float) -> AllowEntry | None:
        """The entry in force that covers ``ip`` (the longest prefix), if any."""
        version = ip.version
        value = int(ip)
        bits = 32 if version == 4 else 128
        for length in self._lengths[version]:
            shift = bits - length
            entry = self._entries.get((version, value >> shift << shift, length))
            if entry is not None and entry.expires_at > now:
                return entry
        return None

    def get(self, net: IPNetwork) -> AllowEntry | None:
        return self._entries.get(_key(net))

    def live(self, now: float) -> list[AllowEntry]:
        """The entries in force, the soonest to end first."""
        return sorted(
            (e for e in self._entries.values() if e.expires_at > now), key=lambda e: e.expires_at
        )

    def prune(self, now: float) -> list[AllowEntry]:
        """Drop the expired entries; returns them."""
        gone = [e for e in self._entries.values() if e.expires_at <= now]
        if gone:
            self._entries = {k: e for k, e in self._entries.items() if e.expires_at > now}
            self._relength()
        return gone
