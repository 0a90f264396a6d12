"""Rate-limiter benchmark: decisions per second through the Limiter API, and memory per key.

    .venv/bin/python bench/bench_limiter.py [--redis-url redis://127.0.0.1:6379/0]
        [--seconds 3] [--concurrency 500] [--keys 1000000] [--uvloop]

Measures
  * memory backend: decide_local() in a tight loop, and decide() from many coroutines;
  * Redis backend: decide() from many coroutines, batched (the default: decisions of one
    event-loop turn share a round trip) and unbatched (one round trip per decision, up to
    64 in flight), on one key space of 100,000 addresses;
  * memory per active key: tracemalloc over 1,000,000 distinct IPv4 keys held by the
    memory backend, against a plain dict of str -> float for reference.

Redis keys are written under a unique prefix and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import random
import time
import tracemalloc
import uuid

from redis.asyncio import Redis

from gateway.core.gcra import Rate
from gateway.metrics import Metrics
from gateway.stores.limiter import Check
from gateway.stores.memory_limiter import MemoryLimiter
from gateway.stores.redis_limiter import RedisLimiter

RATE = Rate(100, 1.0, 200)  # the default per-ip policy


def addresses(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    base = 0x0B000000
    return [str(ipaddress.IPv4Address(base + rng.randrange(1 << 24))) for _ in range(n)]


def bench_memory_sync(seconds: float, keys: list[str]) -> float:
    lim = MemoryLimiter({"per-ip": RATE})
    checks = [[Check("per-ip", RATE, k)] for k in keys]
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for c in checks[:1000]:
            lim.decide_local(c)
        n += 1000
        checks.append(checks.pop(0))  # rotate a little
    return n / seconds


async def drive(lim: object, keys: list[str], seconds: float, concurrency: int) -> float:
    decide = lim.decide  # type: ignore[attr-defined]
    done = 0
    stop = False

    async def worker(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while not stop:
            await decide([Check("per-ip", RATE, keys[rng.randrange(len(keys))])])
            done += 1
            # the memory backend's decide() never suspends: yield as a request would
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    await asyncio.sleep(0.3)  # warm up: connections, script load
    start_done, started = done, time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (done - start_done) / (time.perf_counter() - started)
    stop = True
    await asyncio.gather(*tasks)
    return rate


async def bench_redis(
    url: str, keys: list[str], seconds: float, concurrency: int, *, batched: bool
) -> tuple[float, float]:
    prefix = f"gwbench:{uuid.uuid4().hex[:8]}:"
    metrics = Metrics()
    kwargs = {} if batched else {"max_batch": 1, "max_inflight_batches": 64}
    lim = RedisLimiter(
        {"per-ip": RATE},
        metrics=metrics,
        redis_url=url,
        key_prefix=prefix,
        announce_interval_s=0,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        rate = await drive(lim, keys, seconds, concurrency)
        errors = metrics.registry.get_sample_value("gateway_ratelimit_backend_errors_total") or 0
    finally:
        await lim.close()
        client = Redis.from_url(url)
        try:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=prefix + "*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    await client.delete(*batch)
                    batch.clear()
            if batch:
                await client.delete(*batch)
        finally:
            await client.aclose()
    return rate, errors


def memory_per_key(n: int) -> tuple[float, float]:
    keys = [str(ipaddress.IPv4Address(0x0B000000 + i * 7)) for i in range(n)]
    t = [1000.0]
    lim = MemoryLimiter({"per-ip": RATE}, max_keys=2 * n, clock=lambda: t[0])
    checks = [[Check("per-ip", RATE, k)] for k in keys]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for c in checks:
        lim.decide_local(c)
    gc.collect()
    ours = (tracemalloc.get_traced_memory()[0] - base) / n
    if lim.key_count != n:
        raise RuntimeError(f"expected {n} keys, the limiter holds {lim.key_count}")
    del lim
    gc.collect()
    # reference: a plain dict of fresh str keys -> float TATs
    base = tracemalloc.get_traced_memory()[0]
    plain = {str(ipaddress.IPv4Address(0x0B000000 + i * 7)): 1000.0 + i for i in range(n)}
    plain_bytes = (tracemalloc.get_traced_memory()[0] - base) / n
    tracemalloc.stop()
    del plain
    return ours, plain_bytes


async def main_async(args: argparse.Namespace) -> None:
    keys = addresses(100_000)
    print(f"{'':36}{'decisions/s':>14}")
    mem_sync = bench_memory_sync(args.seconds, keys)
    print(f"{'memory  decide_local() loop':36}{mem_sync:>14,.0f}")
    mem_async = await drive(MemoryLimiter({"per-ip": RATE}), keys, args.seconds, args.concurrency)
    print(f"{'memory  await decide() x' + str(args.concurrency):36}{mem_async:>14,.0f}")
    unbatched, e1 = await bench_redis(
        args.redis_url, keys, args.seconds, args.concurrency, batched=False
    )
    print(f"{'redis   unbatched x' + str(args.concurrency):36}{unbatched:>14,.0f}  errors={e1:.0f}")
    batched, e2 = await bench_redis(
        args.redis_url, keys, args.seconds, args.concurrency, batched=True
    )
    print(f"{'redis   batched x' + str(args.concurrency):36}{batched:>14,.0f}  errors={e2:.0f}")
    print()
    print(f"batched / unbatched redis      {batched / unbatched:6.1f} x")
    print(f"memory (await) / redis batched {mem_async / batched:6.1f} x")
    print(f"memory (sync) / memory (await) {mem_sync / mem_async:6.1f} x")
    print()
    ours, plain = memory_per_key(args.keys)
    print(f"memory per active key, {args.keys:,} distinct IPv4 keys (tracemalloc):")
    print(f"  MemoryLimiter                {ours:7.1f} bytes")
    print(f"  plain dict[str, float]       {plain:7.1f} bytes  ({plain / ours:.2f} x ours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional

        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
