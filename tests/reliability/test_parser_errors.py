"""Parser-level rejections (400, 408, 431): counted, scored, and attributed to the peer.

A malformed request never reaches the pipeline, so it has no resolved client address:
the abuse score goes to the TCP peer.  Behind a trusted proxy that is the proxy, whose
own address is then all that can be banned: clients behind it (resolved from
``X-Forwarded-For``) keep being served.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.reliability.support import (
    GatewayProcess,
    RawUpstream,
    ThreadedUpstream,
    gateway_config,
    metric_sum,
    report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(60)]

MALFORMED = b"GET /x HTTP/1.1\r\nHost: gw\r\nBad Header: v\r\n\r\n"


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    with ThreadedUpstream() as up:
        yield up


def _status(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head[9:12]) if head.startswith(b"HTTP/1.") else 0


def _run(cfg: dict[str, object], name: str) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(cfg, name=name)
    gw.start()
    try:
        gw.wait_started_sync()
        yield gw
    finally:
        gw.stop()
        gw.cleanup()


def test_parser_rejections_are_counted_with_abuse_off(upstream: RawUpstream) -> None:
    """Counting does not depend on abuse scoring (it once returned before counting)."""
    for gw in _run(gateway_config(upstream.url), "parser-count"):
        statuses = [_status(gw.port, MALFORMED) for _ in range(5)]
        counted = metric_sum(gw.metrics_sync(), "gateway_requests_total", code="400")
        report("parser errors, abuse off", statuses=statuses, counted_400=counted)
        assert statuses == [400] * 5
        assert counted == 5


def test_parser_rejections_behind_a_trusted_proxy_ban_only_the_proxy_address(
    upstream: RawUpstream,
) -> None:
    cfg = gateway_config(
        upstream.url,
        trusted_proxies=["127.0.0.1/32"],
        abuse={"enabled": True, "ban_score": 10, "scores": {"bad_request": 2}},
    )
    for gw in _run(cfg, "parser-proxy"):
        statuses = [_status(gw.port, MALFORMED) for _ in range(6)]
        behind = _status(
            gw.port, b"GET /x HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
        )
        own = _status(gw.port, b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        metrics = gw.metrics_sync()
        report(
            "parser errors via a trusted proxy",
            malformed=statuses,
            client_behind_proxy=behind,
            proxy_itself=own,
            bans=metric_sum(metrics, "gateway_bans_total"),
        )
        assert statuses == [400] * 6
        assert metric_sum(metrics, "gateway_requests_total", code="400") == 6
        assert metric_sum(metrics, "gateway_bans_total") == 1
        assert behind == 200  # the client resolved from X-Forwarded-For is not the one banned
        assert own == 403  # requests resolved to the proxy's own address are
