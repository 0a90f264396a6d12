"""The lean Redis connection's pure parts: command packing, endpoints read from URLs, keys."""

from __future__ import annotations

import ssl
from typing import Any, cast

import pytest
from redis.asyncio.sentinel import Sentinel

from gateway.core.gcra import Rate
from gateway.stores.limiter import MAX_KEY_CHARS, bounded_key
from gateway.stores.redis import gcra_calls
from gateway.stores.redis.client import make_redis
from gateway.stores.redis.gcra_calls import PolicyKeys, raw_key
from gateway.stores.redis.resp import Endpoint, RespClient, bulk_string, pack_command


def test_commands_are_packed_as_resp_arrays_of_bulk_strings() -> None:
    assert pack_command("SET", b"k", 5) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n"
    # binary-safe: the length prefix, not a delimiter, bounds each argument
    assert pack_command(b"a\r\nb") == b"*1\r\n$4\r\na\r\nb\r\n"
    assert bulk_string("é") == b"$2\r\n\xc3\xa9\r\n"
    assert bulk_string(-12) == b"$3\r\n-12\r\n"
    assert pack_command() == b"*0\r\n"


def test_plain_url() -> None:
    ep = Endpoint.from_url("redis://10.0.0.5:6380/2")
    assert ep == Endpoint(host="10.0.0.5", port=6380, db=2)
    assert ep.ssl is None
    assert ep.path is None
    assert str(ep) == "redis://10.0.0.5:6380/2"


def test_password_and_user_come_from_the_url_and_stay_out_of_its_description() -> None:
    ep = Endpoint.from_url("redis://:s3cret@h:6379/0")
    assert ep is not None
    assert (ep.username, ep.password) == (None, "s3cret")
    assert "s3cret" not in str(ep)
    ep = Endpoint.from_url("redis://alice:pw@h/0")
    assert ep is not None
    assert (ep.username, ep.password, ep.port) == ("alice", "pw", 6379)


def test_tls_url_verifies_the_server_as_redis_py_does() -> None:
    ep = Endpoint.from_url("rediss://cache.example:6380/0")
    assert ep is not None
    assert isinstance(ep.ssl, ssl.SSLContext)
    assert ep.ssl.verify_mode == ssl.CERT_REQUIRED
    assert ep.ssl.check_hostname
    assert str(ep) == "rediss://cache.example:6380/0"
    relaxed = Endpoint.from_url("rediss://cache.example:6380/0?ssl_cert_reqs=none")
    assert relaxed is not None
    assert relaxed.ssl is not None
    assert relaxed.ssl.verify_mode == ssl.CERT_NONE


def test_unix_socket_url() -> None:
    ep = Endpoint.from_url("unix:///run/redis/redis.sock?db=4")
    assert ep is not None
    assert (ep.path, ep.db) == ("/run/redis/redis.sock", 4)
    assert str(ep) == "unix:/run/redis/redis.sock"


def test_clients_it_does_not_speak_for_give_no_endpoint() -> None:
    assert Endpoint.from_client(make_redis("redis+cluster://127.0.0.1:7000")) is None
    # Through Any: redis-py types Sentinel's constructor in some releases and not in others,
    # and a `type: ignore` is an error under strict mypy wherever it is not needed.
    sentinel = cast("Any", Sentinel)([("127.0.0.1", 26379)])
    assert Endpoint.from_client(sentinel.master_for("mymaster")) is None
    assert Endpoint.from_client(object()) is None
    plain = Endpoint.from_client(make_redis("redis://:pw@127.0.0.1:6390/1"))
    assert plain == Endpoint(port=6390, password="pw", db=1)


def test_connect_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="connect_timeout_s"):
        RespClient(Endpoint(), connect_timeout_s=0)


def test_policy_keys_are_bulk_strings_of_the_stored_keys() -> None:
    pk = PolicyKeys.of("gw:", "per-ip", Rate(20, 1.0, 40))
    key = b"gw:rl:{per-ip:203.0.113.7}:20:1.0:40"
    assert pk.bulk_of("203.0.113.7") == bulk_string(key)
    assert pk.bulk_of("203.0.113.7") is pk.bulk_of("203.0.113.7")  # kept
    assert raw_key(pk.bulk_of("203.0.113.7")) == key
    # a key with \r\n in it: the length prefix bounds it
    assert raw_key(pk.bulk_of("a\r\nb")) == b"gw:rl:{per-ip:a\r\nb}:20:1.0:40"
    # a long key is stored by its digest, as the memory backend stores it
    long = "x" * (MAX_KEY_CHARS + 1)
    assert raw_key(pk.bulk_of(long)) == f"gw:rl:{{per-ip:{bounded_key(long)}}}:20:1.0:40".encode()
    # lone surrogates (undecodable header bytes) are kept as they are
    assert raw_key(pk.bulk_of("\udcff")) == "gw:rl:{per-ip:\udcff}:20:1.0:40".encode(
        "utf-8", "surrogatepass"
    )
    # the kept ones are bounded
    for i in range(gcra_calls.BULKS_KEPT + 5):
        assert raw_key(pk.bulk_of(f"k{i}")) == f"gw:rl:{{per-ip:k{i}}}:20:1.0:40".encode()
    assert len(pk._bulks) <= gcra_calls.BULKS_KEPT
