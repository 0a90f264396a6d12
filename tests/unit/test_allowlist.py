"""Break-glass allow entries: what a request may name, the lookup, the memory list."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.core.allowlist import (
    MAX_TTL_S,
    AllowEntry,
    AllowTable,
    EntryError,
    check_request,
    entry_name,
    parse_target,
)
from gateway.metrics import Metrics
from gateway.stores.allow import AllowList, AllowListFullError

T0 = 1_700_000_000.0


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("203.0.113.5/32", "203.0.113.5"),
        (" 2001:db8::1 ", "2001:db8::/64"),  # an IPv6 address means its ban prefix
        ("2001:db8:0:0:1::/80", "2001:db8:0:0:1::/80"),
        ("2001:db8::1/64", "2001:db8::/64"),  # host bits cleared
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1/128", "2001:db8::1/128"),
    ],
)
def test_targets(text: str, name: str) -> None:
    assert entry_name(parse_target(text, 64)) == name


@pytest.mark.parametrize(
    "text",
    ["", "nope", "203.0.113.0/24", "0.0.0.0/0", "2001:db8::/31", "::/0", "1.2.3.4/33", "x" * 80],
)
def test_bad_targets_name_the_field(text: str) -> None:
    with pytest.raises(EntryError) as err:
        parse_target(text, 64)
    assert err.value.field == "ip"


def test_an_ipv6_address_under_another_prefix_setting() -> None:
    assert entry_name(parse_target("2001:db8:1:2:3::9", 48)) == "2001:db8:1::/48"
    assert entry_name(parse_target("2001:db8:1:2:3::9", 128)) == "2001:db8:1:2:3::9/128"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (["x"], "body"),
        ({"ttl_s": 10, "reason": "r"}, "ip"),
        ({"ip": 5, "ttl_s": 10, "reason": "r"}, "ip"),
        ({"ip": "10.0.0.0/8", "ttl_s": 10, "reason": "r"}, "ip"),
        ({"ip": "10.0.0.1", "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": 0, "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": 0.5, "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": MAX_TTL_S + 1, "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": True, "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": "60", "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": float("nan"), "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": float("inf"), "reason": "r"}, "ttl_s"),
        ({"ip": "10.0.0.1", "ttl_s": 60}, "reason"),
        ({"ip": "10.0.0.1", "ttl_s": 60, "reason": "  "}, "reason"),
        ({"ip": "10.0.0.1", "ttl_s": 60, "reason": "x" * 201}, "reason"),
        ({"ip": "10.0.0.1", "ttl_s": 60, "reason": "a\nforged log line"}, "reason"),
        ({"ip": "10.0.0.1", "ttl_s": 60, "reason": "r", "admin": True}, "admin"),
    ],
)
def test_bad_requests_name_the_field(body: Any, field: str) -> None:
    with pytest.raises(EntryError) as err:
        check_request(body, 64)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_a_good_request() -> None:
    net, ttl, reason = check_request(
        {"ip": "2001:db8::7", "ttl_s": 3600, "reason": " ticket 42 "}, 64
    )
    assert (str(net), ttl, reason) == ("2001:db8::/64", 3600.0, "ticket 42")
    assert check_request({"ip": "1.2.3.4", "ttl_s": MAX_TTL_S, "reason": "r"}, 64)[1] == MAX_TTL_S


def entry(name: str, until: float = T0 + 60) -> AllowEntry:
    return AllowEntry(name, until, "why", T0, "127.0.0.1")


def test_lookup_by_address_and_prefix() -> None:
    table = AllowTable([entry("203.0.113.5"), entry("2001:db8::/64"), entry("2001:db9::/48")])
    assert table.match(ip("203.0.113.5"), T0) is not None
    assert table.match(ip("203.0.113.6"), T0) is None
    assert table.match(ip("2001:db8::ffff:1"), T0) == entry("2001:db8::/64")
    assert table.match(ip("2001:db8:0:1::1"), T0) is None
    assert table.match(ip("2001:db9:0:ffff::1"), T0) == entry("2001:db9::/48")
    assert table.match(ip("::ffff:203.0.113.5"), T0) is None  # another family
    assert table.match(ip("203.0.113.5"), T0 + 60) is None  # ended
    assert table.remove(ipaddress.ip_network("2001:db9::/48")) is not None
    assert table.match(ip("2001:db9:0:ffff::1"), T0) is None
    assert len(table) == 2
    assert [e.ip for e in table.prune(T0 + 61)] == ["203.0.113.5", "2001:db8::/64"]
    assert not table


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_memory_list_exempts_counts_logs_and_expires() -> None:
    clock, metrics = Clock(), Metrics()
    allow = AllowList(metrics=metrics, clock=clock, max_entries=2)
    client = ip("198.51.100.4")
    assert not allow.exempts(client)
    with capture_logs() as logs:
        made = await allow.add(parse_target("198.51.100.4", 64), 60, "ticket 7", "10.0.0.1")
    assert logs == [
        {
            "event": "allow_added",
            "log_level": "warning",
            "ip": "198.51.100.4",
            "by": "10.0.0.1",
            "reason": "ticket 7",
            "ttl_s": 60.0,
            "expires_at": T0 + 60,
        }
    ]
    assert made.as_dict(T0)["expires_in_s"] == 60
    assert allow.exempts(client)
    assert allow.covers(client) == made
    assert sample(metrics, "gateway_allowed_requests_total") == 1
    assert sample(metrics, "gateway_allow_changes_total", action="added") == 1
    assert sample(metrics, "gateway_allow_entries") == 1
    # bounded: a third entry has no room; renewing one that is held does
    await allow.add(parse_target("2001:db8::1", 64), 60, "b", "x")
    with pytest.raises(AllowListFullError):
        await allow.add(parse_target("198.51.100.5", 64), 60, "c", "x")
    await allow.add(parse_target("198.51.100.4", 64), 120, "renewed", "x")
    assert [e.reason for e in await allow.entries()] == ["b", "renewed"]
    clock.now += 61
    assert [e.ip for e in await allow.entries()] == ["198.51.100.4"]
    assert allow.exempts(client)
    assert not allow.exempts(ip("2001:db8::1"))
    clock.now += 60
    assert not allow.exempts(client)
    assert sample(metrics, "gateway_allow_entries") == 0
    assert await allow.entries() == []
    assert await allow.remove(parse_target("198.51.100.4", 64), "x") is None


async def test_memory_list_remove() -> None:
    metrics = Metrics()
    allow = AllowList(metrics=metrics, clock=Clock())
    await allow.add(parse_target("2001:db8::5", 64), 60, "r", "x")
    assert allow.exempts(ip("2001:db8::99"))
    removed = await allow.remove(parse_target("2001:db8::/64", 64), "y")
    assert removed is not None
    assert removed.ip == "2001:db8::/64"
    assert not allow.exempts(ip("2001:db8::99"))
    assert sample(metrics, "gateway_allow_changes_total", action="removed") == 1


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("::ffff:203.0.113.5", "203.0.113.5"),  # clients and bans see it as IPv4
        ("::ffff:203.0.113.5/128", "203.0.113.5"),
        ("fe80::1%eth0", "fe80::/64"),  # a zone id names no other network
    ],
)
def test_ipv4_mapped_and_zoned_targets_mean_what_a_client_address_means(
    text: str, name: str
) -> None:
    net = parse_target(text, 64)
    assert entry_name(net) == name
    table = AllowTable([entry(name)])
    assert table.match(ip("203.0.113.5"), T0) is not None or net.version == 6
    assert table.match(ip("::1"), T0) is None


@pytest.mark.parametrize("text", ["::ffff:0:0/96", "::ffff:203.0.113.0/120"])
def test_ipv4_mapped_prefixes_are_refused(text: str) -> None:
    with pytest.raises(EntryError) as err:
        parse_target(text, 64)
    assert err.value.field == "ip"


@pytest.mark.parametrize(
    "text", ["2001:db8::%eth0/64", "2001:db8::%a\nforged=1/64", "2001:db8::1%\u2028x/64"]
)
def test_a_zone_id_in_a_prefix_is_not_part_of_the_entry(text: str) -> None:
    # one network, one name: else it is two entries in the shared list, and removing
    # 2001:db8::/64 leaves the other in force (and the name carries a line break to logs)
    assert entry_name(parse_target(text, 64)) == "2001:db8::/64"
