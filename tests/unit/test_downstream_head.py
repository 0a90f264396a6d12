"""The request head's Host: read by the framing rules, remembered per Host value."""

from __future__ import annotations

import httptools
import pytest
from multidict import CIMultiDict

from gateway.core.framing import FramingError
from gateway.downstream import head
from gateway.downstream.head import HostCache


def _headers(*hosts: str) -> CIMultiDict[str]:
    return CIMultiDict(("Host", h) for h in hosts)


@pytest.mark.parametrize(
    ("version", "hosts", "target", "expected"),
    [
        ("1.1", ("Example.COM:8080",), "/x", "example.com"),
        ("1.1", ("[::1]:80",), "/", "::1"),
        ("1.1", ("B.example",), "http://b.example/x", "b.example"),  # absolute form
        ("1.0", (), "/", None),
    ],
)
def test_host_of(version: str, hosts: tuple[str, ...], target: str, expected: str | None) -> None:
    cache = HostCache()
    assert cache.host_of(version, _headers(*hosts), target) == expected
    assert cache.host_of(version, _headers(*hosts), target) == expected  # remembered


@pytest.mark.parametrize(
    ("version", "hosts"), [("1.1", ()), ("1.1", ("a", "b")), ("1.1", ("a b",))]
)
def test_refused_hosts_raise_and_are_not_remembered(version: str, hosts: tuple[str, ...]) -> None:
    cache = HostCache()
    for _ in range(2):
        with pytest.raises(FramingError):
            cache.host_of(version, _headers(*hosts), "/")
    assert not cache._hosts


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head, "_HOST_CACHE_MAX", 3)
    cache = HostCache()
    for i in range(10):
        assert cache.host_of("1.1", _headers(f"h{i}.example"), "/") == f"h{i}.example"
        assert len(cache._hosts) <= 3


class _Head:
    """What the parser says of a request head once it is in."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.seen: tuple[str, bool] | None = None

    def on_headers_complete(self) -> None:
        self.seen = (self.parser.get_http_version(), self.parser.should_keep_alive())


@pytest.mark.parametrize("version", ["0.9", "1.0", "1.1", "1.2", "2.0", "2.1", "3.0", "0.1"])
@pytest.mark.parametrize(
    "field",
    [
        b"",
        b"Connection: keep-alive\r\n",
        b"connection: Keep-Alive, Upgrade-X\r\n",
        b"Proxy-Connection: keep-alive\r\n",
        b"Connection: close\r\n",
        b"Keep-Alive: timeout=5\r\n",
    ],
)
def test_kept_alive_without_connection_fields_is_http_1_1(version: str, field: bytes) -> None:
    """The protocol reads the version of a request kept alive that has no Connection or
    Proxy-Connection field as 1.1 without asking the parser (HttpProtocol
    .on_headers_complete): llhttp takes no other version that it keeps alive by default."""
    head = _Head()
    try:
        head.parser.feed_data(f"GET / HTTP/{version}\r\nHost: a\r\n".encode() + field + b"\r\n")
    except httptools.HttpParserError:
        assert version not in ("0.9", "1.0", "1.1", "2.0")
        return
    assert head.seen is not None
    got, keep_alive = head.seen
    assert got == version
    if keep_alive and b"onnection" not in field:
        assert version == "1.1"
