"""The request head's Host: read by the framing rules, remembered per Host value."""

from __future__ import annotations

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
