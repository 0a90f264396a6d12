"""Property tests for what the gateway parses out of client headers.

``parse_ip`` and ``resolve_client`` read ``X-Forwarded-For``, which any client can
write; the request-id pattern decides whether a client's ``X-Request-ID`` is echoed
back in a response header.  None of them may raise, and a client must not be able to
choose the address it is limited and banned as.
"""

from __future__ import annotations

import ipaddress
import string

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.client_ip import IPAddress, Networks, parse_ip, resolve_client
from gateway.pipeline.snapshot import REQUEST_ID_RE

FUZZ = settings(max_examples=200, deadline=None, database=None)

ADDRESSES = st.ip_addresses()
JUNK_TEXT = st.text(
    alphabet=st.sampled_from(string.printable + "\x00[]:%\u00a0\u0660\uff11"), max_size=60
)
NETWORKS = st.builds(
    lambda ip, bits: ipaddress.ip_network(f"{ip}/{bits % (ip.max_prefixlen + 1)}", strict=False),
    ADDRESSES,
    st.integers(0, 128),
)
HOP_TEXT = ADDRESSES.map(str) | JUNK_TEXT | ADDRESSES.map(lambda a: f" {a} ")


def _canonical(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# --------------------------------------------------------------------------- parse_ip


@FUZZ
@given(JUNK_TEXT | st.text(max_size=80))
@example("1.2.3.4:")
@example("[::1")
@example("[]")
@example(":")
@example("1.2.3.4:80:90")
@example("\x00")
def test_parse_ip_never_raises(text: str) -> None:
    ip = parse_ip(text)
    assert ip is None or isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    if isinstance(ip, ipaddress.IPv6Address):
        assert ip.ipv4_mapped is None  # mapped addresses are always folded to IPv4


@FUZZ
@given(ADDRESSES)
def test_parse_ip_round_trips_every_address_form(ip: IPAddress) -> None:
    want = _canonical(ip)
    assert parse_ip(str(ip)) == want
    assert parse_ip(f"  {ip}\t") == want
    assert parse_ip(ip.exploded) == want
    if ip.version == 6:
        assert parse_ip(f"[{ip}]") == want
        assert parse_ip(f"[{ip}]:443") == want
    else:
        assert parse_ip(f"{ip}:8080") == want


# --------------------------------------------------------------------------- resolve_client


@FUZZ
@given(ADDRESSES, st.lists(HOP_TEXT, max_size=6), st.lists(NETWORKS, max_size=3))
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(
    peer: IPAddress, hops: list[str], nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    trusted = Networks(nets)
    peer = _canonical(peer)
    if peer in trusted:
        return
    assert resolve_client(peer, ",".join(hops), trusted) == (peer, False)


@FUZZ
@given(
    ADDRESSES,
    st.lists(HOP_TEXT, max_size=6),
    st.lists(NETWORKS, min_size=1, max_size=3),
    st.lists(ADDRESSES, max_size=3),
)
def test_the_client_is_a_hop_the_trusted_chain_vouched_for(
    client: IPAddress,
    forged: list[str],
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    proxies: list[IPAddress],
) -> None:
    """Whatever a client prepends, the result is the address the first trusted proxy saw.

    The chain is ``forged..., client, proxy1, ..., proxyN`` arriving from a trusted peer,
    where the proxies are trusted and the client is not: the answer is ``client``.
    """
    trusted = Networks(nets)
    client = _canonical(client)
    peer = _canonical(nets[0].network_address)
    if client in trusted or peer not in trusted:
        return
    inner = [str(p) for p in proxies if _canonical(p) in trusted]
    chain = ",".join([*forged, str(client), *inner])
    got, via_proxy = resolve_client(peer, chain, trusted)
    assert via_proxy is True
    assert got == client


@FUZZ
@given(st.lists(HOP_TEXT, max_size=6), st.lists(NETWORKS, min_size=1, max_size=3))
def test_resolve_client_from_a_trusted_peer_never_raises(
    hops: list[str], nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    trusted = Networks(nets)
    peer = _canonical(nets[0].network_address)
    if peer not in trusted:
        return
    chain = ",".join(hops)
    got, via_proxy = resolve_client(peer, chain, trusted)
    assert via_proxy is True
    parsed = {_canonical(ip) for h in chain.split(",") if (ip := parse_ip(h)) is not None}
    assert got == peer or got in parsed


@FUZZ
@given(ADDRESSES, st.lists(NETWORKS, max_size=4))
def test_network_membership_matches_ipaddress(
    ip: IPAddress, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    want = any(ip.version == n.version and ip in n for n in nets)
    assert (ip in Networks(nets)) is want


# --------------------------------------------------------------------------- request id

RID_ALPHABET = string.ascii_letters + string.digits + "._-"


def _rid_ok(value: str) -> bool:
    """The contract (SPEC section 4): 1-128 characters of [A-Za-z0-9._-]."""
    return 1 <= len(value) <= 128 and all(c in RID_ALPHABET for c in value)


@FUZZ
@given(st.text(alphabet=st.sampled_from(RID_ALPHABET), min_size=0, max_size=140))
def test_request_id_accepts_exactly_the_contract_alphabet_and_length(value: str) -> None:
    assert (REQUEST_ID_RE.match(value) is not None) is _rid_ok(value)


@FUZZ
@given(st.text(max_size=140))
def test_request_id_never_accepts_what_the_contract_refuses(value: str) -> None:
    if REQUEST_ID_RE.match(value) is not None:
        assert _rid_ok(value)


def test_request_id_with_a_trailing_newline_is_refused() -> None:
    assert REQUEST_ID_RE.match("abc\n") is None
