"""Bans shared through a real Redis: two stores on two clients are two replicas."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from gateway.config import Abuse
from gateway.metrics import Metrics
from gateway.stores import make_ban_store
from gateway.stores.bans import Ban, BanStore
from gateway.stores.redis.bans import RedisBanStore

IP = "203.0.113.9"

Factory = Callable[..., Awaitable[RedisBanStore]]


async def eventually(check: Callable[[], Any], within: float, step: float = 0.02) -> float:
    """Seconds until ``check()`` is truthy; fails after ``within`` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"not true within {within} s")
        await asyncio.sleep(step)
    return time.monotonic() - start


def bans_total(*metrics: Metrics, reason: str = "suspicious_path") -> float:
    values = (
        m.registry.get_sample_value("gateway_bans_total", {"reason": reason}) for m in metrics
    )
    return sum(v or 0.0 for v in values)


class Replicas:
    """Stores made on their own clients, all closed (and their keys deleted) at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"test:bans:{uuid.uuid4().hex[:12]}:"
        self.stores: list[BanStore] = []
        self.clients: list[Any] = []

    def client(self) -> Any:
        client = aioredis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        self.clients.append(client)
        return client

    async def store(self, metrics: Metrics | None = None, **abuse: Any) -> RedisBanStore:
        store = make_ban_store(
            Abuse(**abuse),
            metrics=metrics or Metrics(),
            redis=self.client(),
            key_prefix=self.prefix,
        )
        assert isinstance(store, RedisBanStore)
        self.stores.append(store)
        await store.start()
        return store

    async def cleanup(self) -> None:
        for store in self.stores:
            await store.close()
        client = self.client()
        try:
            keys = [k async for k in client.scan_iter(match=f"*{self.prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        except (OSError, aioredis.RedisError):
            pass  # a private server that is stopped: nothing to clean
        for c in self.clients:
            await c.aclose()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Replicas]:
    r = Replicas(redis_url)
    try:
        yield r
    finally:
        await r.cleanup()


async def ban_through(store: BanStore, ip: str = IP) -> Ban:
    store.report(ip, "suspicious_path")
    store.report(ip, "suspicious_path")
    await eventually(lambda: store.banned(ip) is not None, 1.0)
    ban = store.banned(ip)
    assert ban is not None
    return ban


async def test_a_ban_is_in_force_on_every_replica_within_a_second(replicas: Replicas) -> None:
    a, b = await replicas.store(), await replicas.store()
    a.report(IP, "suspicious_path")
    a.report(IP, "suspicious_path")
    elapsed = await eventually(lambda: b.banned(IP) is not None, 1.0)
    assert elapsed < 1.0
    ban_a, ban_b = a.banned(IP), b.banned(IP)
    assert ban_a is not None
    assert ban_a == ban_b
    assert ban_a.reason == "suspicious_path"
    assert ban_a.ban_s == pytest.approx(600)
    assert ban_a.expires_at == pytest.approx(time.time() + 600, abs=5)
    assert b.banned("203.0.113.10") is None


async def test_bans_survive_a_gateway_restart(replicas: Replicas) -> None:
    a = await replicas.store()
    ban = await ban_through(a)
    await a.close()
    again = await replicas.store()
    assert again.banned(IP) == ban  # in force as soon as start() returns


async def test_unban_through_one_replica_lifts_it_everywhere(replicas: Replicas) -> None:
    a, b = await replicas.store(), await replicas.store()
    await ban_through(a)
    await eventually(lambda: b.banned(IP) is not None, 1.0)
    with capture_logs() as logs:
        assert await b.unban(IP) is True
        assert await b.unban(IP) is False
    assert [(e["event"], e["ip"], e["by"]) for e in logs] == [("unban", IP, "admin")]
    assert b.banned(IP) is None
    elapsed = await eventually(lambda: a.banned(IP) is None, 1.0)
    assert elapsed < 1.0
    assert await a.list_bans() == []
    # The offence is remembered: the next ban lasts twice as long.
    ban = await ban_through(b)
    assert ban.offences == 2
    assert ban.ban_s == pytest.approx(1200)


async def test_events_on_two_replicas_add_up_to_one_ban(replicas: Replicas) -> None:
    ma, mb = Metrics(), Metrics()
    a, b = await replicas.store(ma), await replicas.store(mb)
    a.report(IP, "suspicious_path")
    await eventually(lambda: a.score(IP) == 25 and not a._pending, 1.0)
    assert a.banned(IP) is None
    b.report(IP, "suspicious_path")
    await eventually(lambda: a.banned(IP) is not None and b.banned(IP) is not None, 1.0)
    ban = b.banned(IP)
    assert ban is not None
    assert ban.score == pytest.approx(50)
    assert bans_total(ma, mb) == 1  # one replica made the ban, once
    # Further events of a banned IP are not scored again anywhere.
    a.report(IP, "suspicious_path")
    b.report(IP, "suspicious_path")
    await asyncio.sleep(0.2)
    assert bans_total(ma, mb) == 1


async def test_a_scan_spread_over_replicas_is_scored_together(replicas: Replicas) -> None:
    a, b = await replicas.store(), await replicas.store()
    for _ in range(12):
        a.report(IP, "bad_request")  # 24 points
        b.report(IP, "bad_request")  # 24 points
    await asyncio.sleep(0.2)
    assert a.banned(IP) is None
    b.report(IP, "not_found")
    b.report(IP, "not_found")  # 50
    await eventually(lambda: a.banned(IP) is not None, 1.0)
    ban = a.banned(IP)
    assert ban is not None
    assert ban.reason == "not_found"


async def test_list_bans(replicas: Replicas) -> None:
    a, b = await replicas.store(), await replicas.store()
    await ban_through(a, "192.0.2.1")
    await ban_through(b, "2001:db8::7")
    bans = await a.list_bans()
    assert [x.ip for x in bans] == ["192.0.2.1", "2001:db8::7"]
    now = time.time()
    for ban in bans:
        assert ban.reason == "suspicious_path"
        assert ban.score == pytest.approx(50)
        assert ban.offences == 1
        assert ban.expires_at == pytest.approx(now + 600, abs=5)
        assert set(ban.as_dict()) >= {"ip", "reason", "score", "expires_at", "offences"}
    assert await b.list_bans() == bans


async def test_bans_expire_everywhere(replicas: Replicas) -> None:
    ma, mb = Metrics(), Metrics()
    a, b = await replicas.store(ma, ban_s=0.5), await replicas.store(mb, ban_s=0.5)
    await ban_through(a)
    await eventually(lambda: b.banned(IP) is not None, 1.0)
    assert mb.registry.get_sample_value("gateway_active_bans") == 1
    await eventually(lambda: a.banned(IP) is None and b.banned(IP) is None, 1.0)
    assert await b.list_bans() == []
    await eventually(lambda: mb.registry.get_sample_value("gateway_active_bans") == 0, 1.0)


async def test_shadow_mode_blocks_nothing_but_counts(replicas: Replicas) -> None:
    metrics = Metrics()
    a = await replicas.store(metrics, mode="shadow")
    with capture_logs() as logs:
        a.report(IP, "suspicious_path")
        a.report(IP, "suspicious_path")
        await eventually(lambda: bans_total(metrics) == 1, 1.0)
    assert [e["event"] for e in logs] == ["ban_shadow"]
    assert a.banned(IP) is None
    assert await a.list_bans() == []


async def test_ban_log_event(replicas: Replicas) -> None:
    a = await replicas.store()
    with capture_logs() as logs:
        await ban_through(a)
    (event,) = [e for e in logs if e["event"] == "ban"]
    assert event["ip"] == IP
    assert event["reason"] == "suspicious_path"
    assert event["score"] == 50
    assert event["ban_s"] == 600
    assert event["offences"] == 1
    assert event["expires_at"] == pytest.approx(time.time() + 600, abs=5)


async def test_redis_outage_falls_back_and_recovers(private_redis: Any) -> None:
    replicas = Replicas(private_redis.url)
    try:
        a, b = await replicas.store(), await replicas.store()
        await ban_through(a, "192.0.2.1")
        await eventually(lambda: b.banned("192.0.2.1") is not None, 1.0)

        private_redis.stop()
        with capture_logs() as logs:
            started = time.monotonic()
            for i in range(1000):
                a.report(f"198.51.100.{i % 200}", "not_found")  # never blocks, never raises
            assert time.monotonic() - started < 0.5
            a.report("192.0.2.2", "suspicious_path")
            a.report("192.0.2.2", "suspicious_path")
            # Scored and banned locally once the failure is noticed.
            await eventually(lambda: a.banned("192.0.2.2") is not None, 3.0)
            await eventually(lambda: b.degraded, 3.0)
        assert any(e["event"] == "redis_unavailable" for e in logs)
        # Bans synced before the outage stay in force.
        assert a.banned("192.0.2.1") is not None
        assert b.banned("192.0.2.1") is not None
        assert {x.ip for x in await a.list_bans()} == {"192.0.2.1", "192.0.2.2"}
        b.report("192.0.2.3", "suspicious_path")
        b.report("192.0.2.3", "suspicious_path")
        assert b.banned("192.0.2.3") is not None

        private_redis.start()  # same port, empty: the data is gone
        with capture_logs() as logs:
            await eventually(lambda: not a.degraded and not b.degraded, 5.0)
        assert any(e["event"] == "redis_recovered" for e in logs)
        # Bans made during the outage, and those Redis lost, are shared again.
        shared = ("192.0.2.1", "192.0.2.2", "192.0.2.3")
        await eventually(lambda: all(a.banned(ip) and b.banned(ip) for ip in shared), 2.0)
        assert {x.ip for x in await b.list_bans()} == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
        # And new bans propagate again.
        await ban_through(b, "192.0.2.4")
        await eventually(lambda: a.banned("192.0.2.4") is not None, 1.0)
        assert await a.unban("192.0.2.2") is True
        await eventually(lambda: b.banned("192.0.2.2") is None, 1.0)
    finally:
        await replicas.cleanup()


async def test_redis_down_at_start(private_redis: Any) -> None:
    private_redis.stop()
    replicas = Replicas(private_redis.url)
    try:
        a = await replicas.store()
        assert a.degraded
        await ban_through(a)
        assert await a.list_bans() != []
        assert await a.unban(IP) is True
        assert a.banned(IP) is None
        private_redis.start()
        await eventually(lambda: not a.degraded, 3.0)
        await ban_through(a, "192.0.2.9")
        assert [x.ip for x in await a.list_bans()] == ["192.0.2.9"]
    finally:
        await replicas.cleanup()


async def test_a_hung_redis_times_out_and_unbans_are_replayed(private_redis: Any) -> None:
    replicas = Replicas(private_redis.url)
    try:
        a, b = await replicas.store(), await replicas.store()
        await ban_through(a)
        await eventually(lambda: b.banned(IP) is not None, 1.0)
        admin = replicas.client()
        await admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        started = time.monotonic()
        assert await b.unban(IP) is True  # times out against Redis, lifted locally
        assert time.monotonic() - started < 1.5
        assert b.degraded
        assert b.banned(IP) is None
        assert a.banned(IP) is not None
        await eventually(lambda: not b.degraded, 4.0)
        await eventually(lambda: a.banned(IP) is None, 1.0)
        assert await a.list_bans() == []
    finally:
        await replicas.cleanup()


async def test_switching_from_shadow_to_enforce(replicas: Replicas) -> None:
    metrics = Metrics()
    a = await replicas.store(metrics, mode="shadow")
    a.report(IP, "suspicious_path")
    a.report(IP, "suspicious_path")
    await eventually(lambda: bans_total(metrics) == 1, 1.0)
    a.reconfigure(Abuse())
    # The shadow ban does not hold back scoring once bans are enforced.
    await ban_through(a)
    assert bans_total(metrics) == 2


async def test_clients_that_decode_responses_work_too(replicas: Replicas) -> None:
    text_client = aioredis.from_url(replicas.url, decode_responses=True)
    replicas.clients.append(text_client)
    a = make_ban_store(Abuse(), metrics=Metrics(), redis=text_client, key_prefix=replicas.prefix)
    replicas.stores.append(a)
    await a.start()
    b = await replicas.store()  # bytes replies
    ban = await ban_through(a)
    await eventually(lambda: b.banned(IP) == ban, 1.0)
    assert await a.list_bans() == await b.list_bans() == [ban]
    assert await a.unban(IP) is True
    await eventually(lambda: b.banned(IP) is None, 1.0)


async def test_scores_in_flight_when_a_replica_stops_are_not_lost(replicas: Replicas) -> None:
    """close() lets a flush under way finish instead of cancelling what it carries."""
    a = await replicas.store()
    await replicas.client().execute_command("CLIENT", "PAUSE", "300", "WRITE")
    a.report(IP, "suspicious_path")
    a.report(IP, "suspicious_path")
    await asyncio.sleep(0.05)  # the scores are on their way, held by the paused server
    await a.close()
    again = await replicas.store()
    assert again.banned(IP) is not None


async def test_a_ban_whose_reply_was_lost_is_published_at_the_next_event(
    replicas: Replicas,
) -> None:
    """The scoring script bans a client, but its reply never comes back (a Redis timeout
    at that moment): the ban is in the client's score, not in the shared list. The
    client's next scored event finds it and publishes it, so every replica enforces it
    (it used to be ignored until it ended: "banned, do not score")."""
    metrics = Metrics()
    a, b = await replicas.store(metrics), await replicas.store()
    client = replicas.client()
    store_args = [*a._score_args, "", "suspicious_path", "25", "suspicious_path", "25"]
    answer = await client.eval(
        a._score_script.text, 1, a._score_key(IP), *store_args
    )  # the reply that was lost
    assert int(answer[0]) == 1
    await asyncio.sleep(0.3)  # a sync round: nobody knows of it
    assert a.banned(IP) is None
    assert b.banned(IP) is None

    a.report(IP, "not_found")
    await eventually(lambda: b.banned(IP) is not None, 2.0)
    ban = b.banned(IP)
    assert ban is not None
    assert ban.reason == "suspicious_path"
    assert ban.score == 50
    assert ban.expires_at == pytest.approx(time.time() + 600, abs=5)
    assert a.banned(IP) == ban
    assert bans_total(metrics) == 1  # counted where it was published (the reply was lost)

    # an answer that was on its way when an admin lifted the ban does not bring it back
    sent_at = a._clock()
    assert await a.unban(IP)
    in_flight = [2, "suspicious_path", "50", "0", "1", repr(time.time()), repr(ban.expires_at)]
    assert a._missed_ban(IP, in_flight, sent_at) is None
    assert a.banned(IP) is None
