"""Redis clients for the gateway's shared state (rate limits, bans, the Redis health check).

URL forms
    ``redis://[user:password@]host:port[/db]`` and ``rediss://...`` (TLS): one Redis
    (or a Sentinel-managed primary behind a stable address) -> ``redis.asyncio.Redis``.

    ``redis+cluster://host:port`` / ``rediss+cluster://host:port``, or any of the above
    with ``?cluster=true``: Redis Cluster, discovered from that seed node ->
    ``redis.asyncio.RedisCluster`` (database 0 only, as Cluster has no others).

Settings for a request path that must not stall on Redis
    * connect and read timeouts of ``socket_timeout_s`` (250 ms by default);
    * no retries inside the client: a retry with back-off would multiply the time a
      request waits; callers decide what a failure means (fallback, breaker);
    * a bounded pool (``max_connections``, per node on Cluster);
    * ``health_check_interval``: a connection idle for longer is PINGed before use, so a
      connection silently dropped by a NAT or a proxy fails fast and is replaced;
    * the hiredis parser, which redis-py picks up by itself when installed.

Clients reconnect by themselves: a failed connection is dropped and the next command
opens a new one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["is_cluster_url", "make_redis", "redact_url"]

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_PLAIN_SCHEMES = {"redis", "rediss", "unix"}
_TRUE = {"1", "true", "yes", "on"}


def _split_cluster(url: str) -> tuple[str, bool]:
    """The URL redis-py understands, and whether it names a cluster."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    cluster = False
    if scheme in _CLUSTER_SCHEMES:
        scheme, cluster = _CLUSTER_SCHEMES[scheme], True
    elif scheme not in _PLAIN_SCHEMES:
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r} "
            "(redis, rediss, unix, redis+cluster, rediss+cluster)"
        )
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() == "cluster":
            cluster = cluster or value.lower() in _TRUE
        else:
            query.append((name, value))
    plain = urlunsplit((scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    return plain, cluster


def is_cluster_url(url: str) -> bool:
    return _split_cluster(url)[1]


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def make_redis(
    url: str,
    *,
    socket_timeout_s: float = 0.25,
    max_connections: int = 64,
    health_check_interval_s: float = 15.0,
    decode_responses: bool = False,
) -> Any:
    """A ``redis.asyncio.Redis`` or ``RedisCluster`` for ``url`` (see the module doc).

    Nothing is connected yet: the first command connects, so a Redis that is down
    at start does not stop the gateway from starting.
    """
    if socket_timeout_s <= 0:
        raise ValueError("socket_timeout_s must be > 0")
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    plain, cluster = _split_cluster(url)
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s,
        "health_check_interval": health_check_interval_s,
        "decode_responses": decode_responses,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": max_connections,
    }
    if cluster:
        return RedisCluster.from_url(plain, **common)
    return Redis.from_url(plain, **common)
