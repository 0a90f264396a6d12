"""RFC 9112 framing rules: Host values, the host a request is for, transfer codings."""

from __future__ import annotations

import pytest

from gateway.core.framing import (
    FramingError,
    check_transfer_coding,
    parse_host,
    parse_host_entry,
    request_host,
    target_authority,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("example.com:8000", ("example.com", 8000)),
        ("EXAMPLE.com", ("example.com", None)),
        ("EXAMPLE.com.", ("example.com", None)),
        ("example.com.:80", ("example.com", 80)),
        ("example.com:", ("example.com", None)),  # empty port: RFC 3986 allows it
        ("example.com:080", ("example.com", 80)),
        ("example.com:65535", ("example.com", 65535)),
        ("localhost", ("localhost", None)),
        ("my_host-1.internal~x", ("my_host-1.internal~x", None)),
        ("127.0.0.1", ("127.0.0.1", None)),
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("[::1]", ("::1", None)),
        ("[::1]:8000", ("::1", 8000)),
        ("[0:0:0:0:0:0:0:1]", ("::1", None)),
        ("[2001:DB8::A]:443", ("2001:db8::a", 443)),
        ("[::ffff:1.2.3.4]", ("::ffff:102:304", None)),
        ("[::1]:", ("::1", None)),
        # refused
        ("", None),
        (":8000", None),
        (".", None),
        ("example.com..", None),
        ("a..b", None),
        (".example.com", None),
        ("[::1", None),
        ("::1", None),
        ("::1]", None),
        ("[]", None),
        ("[::1]x", None),
        ("[::1]8000", None),
        ("[::1]:x", None),
        ("[fe80::1%25eth0]", None),
        ("[fe80::1%eth0]", None),
        ("[v1.fe]", None),
        ("[1.2.3.4]", None),
        ("[example.com]", None),
        ("example.com:http", None),
        ("example.com:8000x", None),
        ("example.com:-1", None),
        ("example.com:+80", None),
        ("example.com:65536", None),
        ("example.com:000080", None),
        ("example.com:80:80", None),
        ("example.com:\u0668\u0660", None),  # Arabic-Indic digits are not a port
        ("a b", None),
        ("a\tb", None),
        ("a,b", None),
        ("a, b", None),
        ("a/b", None),
        ("a\\b", None),
        ("a@b", None),
        ("user@example.com", None),
        ("a?b", None),
        ("a#b", None),
        ("ex%41mple.com", None),
        ("a;b", None),
        ("exämple.com", None),
        ("\x00", None),
    ],
)
def test_parse_host(value: str, expected: tuple[str, int | None] | None) -> None:
    assert parse_host(value) == expected


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("API.example", "api.example"),
        ("api.example.", "api.example"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_allowed_hosts_entries_are_normalised(entry: str, expected: str) -> None:
    assert parse_host_entry(entry) == expected


@pytest.mark.parametrize(
    "entry", ["api.example:8000", "[::1]:80", "api.example:", "a b", "", "[::1", "*.example"]
)
def test_allowed_hosts_entries_that_are_not_hosts_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=r"port|not a host"):
        parse_host_entry(entry)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/p?q", None),
        ("*", None),
        ("example.com:443", None),
        ("http://a.example/p", ("http", "a.example")),
        ("HTTP://a.example", ("http", "a.example")),
        ("https://a.example:8443?x", ("https", "a.example:8443")),
        ("http://[::1]:80#f", ("http", "[::1]:80")),
        ("http://u@a.example/", ("http", "u@a.example")),
        ("http:///p", ("http", "")),
    ],
)
def test_target_authority(target: str, expected: tuple[str, str] | None) -> None:
    assert target_authority(target) == expected


@pytest.mark.parametrize(
    ("version", "hosts", "target", "expected"),
    [
        ("1.1", ["api.example"], "/", "api.example"),
        ("1.1", ["API.example.:8000"], "/", "api.example"),
        ("1.1", ["[::1]:8000"], "/", "::1"),
        ("1.0", [], "/", None),
        ("1.0", ["a.example"], "/", "a.example"),
        ("1.0", [], "http://a.example/p", "a.example"),
        ("1.1", ["a.example"], "http://a.example/p", "a.example"),
        ("1.1", ["a.example:80"], "http://A.example/p", "a.example"),
        ("1.1", ["a.example"], "http://a.example:80/p", "a.example"),
        ("1.1", ["a.example:443"], "https://a.example/p", "a.example"),
        ("1.1", ["[::1]"], "http://[0::1]/", "::1"),
        ("1.1", ["a.example"], "*", "a.example"),
    ],
)
def test_request_host(version: str, hosts: list[str], target: str, expected: str | None) -> None:
    assert request_host(version, hosts, target) == expected


@pytest.mark.parametrize(
    ("version", "hosts", "target", "detail"),
    [
        ("1.1", [], "/", "needs a Host"),
        ("1.1", ["a", "a"], "/", "more than one"),
        ("1.1", ["a", "b"], "/", "more than one"),
        ("1.0", ["a", "b"], "/", "more than one"),
        ("1.1", [""], "/", "not a valid host"),
        ("1.1", ["a b"], "/", "not a valid host"),
        ("1.1", ["a.example, b.example"], "/", "not a valid host"),
        ("1.1", ["[::1"], "/", "not a valid host"),
        ("1.1", ["::1"], "/", "not a valid host"),
        ("1.0", ["a/b"], "/", "not a valid host"),
        ("1.1", [], "http://a.example/", "needs a Host"),
        ("1.1", ["b.example"], "http://a.example/", "differs"),
        ("1.1", ["a.example:8000"], "http://a.example/", "differs"),
        ("1.1", ["a.example"], "https://a.example:80/", "differs"),
        ("1.1", ["a.example"], "http://u@a.example/", "authority"),
        ("1.1", ["a.example"], "http:///p", "authority"),
        ("1.1", ["a.example"], "ftp://a.example/", "scheme"),
        ("1.0", [], "http://a b/", "authority"),
    ],
)
def test_request_host_refusals(version: str, hosts: list[str], target: str, detail: str) -> None:
    with pytest.raises(FramingError, match=detail) as info:
        request_host(version, hosts, target)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "values",
    [
        ["chunked"],
        ["Chunked"],
        ["CHUNKED"],
        [" chunked\t"],
        [", chunked"],
        ["chunked,"],
        ["", "chunked"],
        [",,chunked, ,"],
    ],
)
def test_chunked_alone_is_accepted(values: list[str]) -> None:
    check_transfer_coding(values)


@pytest.mark.parametrize(
    ("values", "status"),
    [
        (["gzip, chunked"], 501),
        (["gzip", "chunked"], 501),
        (["identity"], 501),
        (["identity, chunked"], 501),
        (["x-custom, chunked"], 501),
        (["gzip"], 501),
        (["deflate, gzip, chunked"], 501),
        (["GZIP, Chunked"], 501),
        (["chunked, gzip"], 400),
        (["chunked", "gzip"], 400),
        (["chunked, identity"], 400),
        (["chunked, chunked"], 400),
        (["chunked", "chunked"], 400),
        (["Chunked", "CHUNKED"], 400),
        (["gzip, chunked", "chunked"], 400),
        (["chunked;x=1"], 400),
        (["chunked ; x=1"], 400),
        ([""], 400),
        ([" , "], 400),
        (['"chunked"'], 400),
        (["chunked\x0b"], 400),
        (["chun ked"], 400),
        (["gzip;q=1, chunked"], 501),
    ],
)
def test_other_codings_are_refused(values: list[str], status: int) -> None:
    with pytest.raises(FramingError) as info:
        check_transfer_coding(values)
    assert info.value.status == status
