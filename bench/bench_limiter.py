"""Rate-limiter benchmark: decisions per second through the Limiter API, and memory per key.

    .venv/bin/python bench/bench_limiter.py [--redis-url redis://127.0.0.1:6379/0]
        [--seconds 3] [--concurrency 500] [--policies 1] [--work-us 0] [--spread 1]
        [--batched-only] [--keys 1000000] [--uvloop]

Measures
  * memory backend: decide_local() in a tight loop, and from many coroutines;
  * Redis backend: decide() from many coroutines, batched (the default: decisions of one
    event-loop turn share a round trip) and unbatched (one round trip per decision, up to
    64 in flight), on one key space of 100,000 addresses;
  * memory per active key: tracemalloc over 1,000,000 distinct IPv4 keys held by the
    memory backend, against a plain dict of str -> float for reference (``--keys 0``
    skips it).

Each coroutine asks as a request does: ``decide_local()``, then ``await decide()`` when
that cannot answer, with ``--policies`` checks per call (the client's address under that
many policies; a gateway request under two policies makes one call of two checks).  For
each run: calls per second; CPU per call, this process's (``time.process_time``, what
the gateway pays) and redis-server's (``INFO cpu``, what Redis pays); calls per round
trip (``EVALSHA`` calls in ``INFO commandstats``).  Other clients of that Redis count in
the last two.  Decisions per second are calls per second times ``--policies``.

By default every caller asks again as soon as it is answered: all of them ask in the
same loop turn, and a batch holds ``--concurrency`` calls.  A saturated gateway is
different: its loop is never idle, and each turn brings a few requests to the limiter.
``--work-us`` (CPU spent per call outside the limiter, as the rest of a request) and
``--spread`` (a caller yields to the loop 1 to SPREAD times between calls, so callers
drift apart) model that, e.g. ``--concurrency 50 --spread 10 --work-us 100 --policies 2``
(about 5 calls per turn; the CPU per call of redis minus memory is what the Redis
backend adds to a request).

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
from dataclasses import dataclass

from redis.asyncio import Redis

from gateway.core.gcra import Rate
from gateway.metrics import Metrics
from gateway.stores.limiter import Check, Limiter
from gateway.stores.memory.limiter import MemoryLimiter
from gateway.stores.redis.limiter import RedisLimiter

RATE = Rate(100, 1.0, 200)  # the default per-ip policy
# further policies on the same key, never refusing (as the gateway benchmark's second one)
WIDE = Rate(1_000_000_000, 3600.0, 1_000_000)


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


def policies(n: int) -> list[tuple[str, Rate]]:
    return [("per-ip", RATE)] + [(f"wide-{i}", WIDE) for i in range(1, n)]


def work_units(us: float) -> int:
    """How many ``sum(range(n))`` steps take about ``us`` microseconds of CPU here."""
    if us <= 0:
        return 0
    n = 100_000
    started = time.process_time()
    for _ in range(20):
        sum(range(n))
    per_unit_us = (time.process_time() - started) / (20 * n) * 1e6
    return max(1, round(us / per_unit_us))


@dataclass(frozen=True)
class Load:
    """How the callers ask (see the module docstring)."""

    seconds: float
    concurrency: int
    policies: int
    work: int  # sum(range(work)) per call, outside the limiter
    spread: int  # a caller yields 1..spread times between two calls


@dataclass
class Run:
    calls_per_s: float
    cpu_us: float  # this process, per call
    redis_cpu_us: float | None = None  # redis-server, per call
    calls_per_trip: float | None = None  # calls per EVALSHA
    errors: float = 0.0


async def redis_stats(url: str) -> tuple[float, int]:
    """redis-server's CPU seconds so far, and its EVALSHA calls so far."""
    client = Redis.from_url(url)
    try:
        cpu = await client.info("cpu")
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    evalsha = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), evalsha


async def drive(lim: Limiter, keys: list[str], load: Load, *, redis_url: str | None = None) -> Run:
    done = 0
    stop = False
    pols = policies(load.policies)
    work, spread = load.work, load.spread

    async def worker(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while not stop:
            if work:
                sum(range(work))  # the rest of a request
            key = keys[rng.randrange(len(keys))]
            checks = [Check(name, rate, key) for name, rate in pols]
            if lim.decide_local(checks) is None:
                await lim.decide(checks)
            done += 1
            # the memory backend's decide() never suspends: yield as a request would
            for _ in range(1 + (rng.randrange(spread) if spread > 1 else 0)):
                await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(worker(i)) for i in range(load.concurrency)]
    await asyncio.sleep(0.3)  # warm up: connections, script load
    redis_cpu, trips = await redis_stats(redis_url) if redis_url else (0.0, 0)
    start_done, started, cpu = done, time.perf_counter(), time.process_time()
    await asyncio.sleep(load.seconds)
    calls = done - start_done
    cpu = time.process_time() - cpu
    elapsed = time.perf_counter() - started
    redis_after = await redis_stats(redis_url) if redis_url else (0.0, 0)
    stop = True
    await asyncio.gather(*tasks)
    run = Run(calls / elapsed, cpu / calls * 1e6)
    if redis_url:
        run.redis_cpu_us = (redis_after[0] - redis_cpu) / calls * 1e6
        run.calls_per_trip = calls / max(1, redis_after[1] - trips)
    return run


async def bench_redis(url: str, keys: list[str], load: Load, *, batched: bool) -> Run:
    prefix = f"gwbench:{uuid.uuid4().hex[:8]}:"
    metrics = Metrics()
    kwargs = {} if batched else {"max_batch": 1, "max_inflight_batches": 64}
    lim = RedisLimiter(
        dict(policies(load.policies)),
        metrics=metrics,
        redis_url=url,
        key_prefix=prefix,
        announce_interval_s=0,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        run = await drive(lim, keys, load, redis_url=url)
        run.errors = (
            metrics.registry.get_sample_value("gateway_ratelimit_backend_errors_total") or 0
        )
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
    return run


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


def row(name: str, run: Run, n_policies: int) -> str:
    line = f"{name:30}{run.calls_per_s:>10,.0f}{run.calls_per_s * n_policies:>12,.0f}"
    line += f"{run.cpu_us:>9.2f}"
    if run.redis_cpu_us is not None and run.calls_per_trip is not None:
        line += f"{run.redis_cpu_us:>9.2f}{run.calls_per_trip:>11.1f}  errors={run.errors:.0f}"
    return line


async def main_async(args: argparse.Namespace) -> None:
    keys = addresses(100_000)
    load = Load(
        args.seconds, args.concurrency, args.policies, work_units(args.work_us), args.spread
    )
    n, c = load.policies, load.concurrency
    print(
        f"{n} check(s) per call, {c} concurrent callers, "
        f"{args.work_us:g} us of other work per call, spread {load.spread}"
    )
    print(
        f"{'':30}{'calls/s':>10}{'decisions/s':>12}{'CPU us':>9}{'redis us':>9}{'calls/trip':>11}"
    )
    mem_sync = bench_memory_sync(args.seconds, keys)
    print(f"{'memory  decide_local() loop':30}{mem_sync:>10,.0f}{mem_sync:>12,.0f}")
    mem = await drive(MemoryLimiter(dict(policies(n))), keys, load)
    print(row(f"memory  x{c} callers", mem, n))
    if not args.batched_only:
        unbatched = await bench_redis(args.redis_url, keys, load, batched=False)
        print(row(f"redis   unbatched x{c} callers", unbatched, n))
    batched = await bench_redis(args.redis_url, keys, load, batched=True)
    print(row(f"redis   batched x{c} callers", batched, n))
    print()
    print("CPU us: this process, per call; redis us: redis-server, per call")
    if not args.batched_only:
        speedup = batched.calls_per_s / unbatched.calls_per_s
        print(f"batched / unbatched redis, calls/s     {speedup:6.2f} x")
    ratio = batched.calls_per_s / mem.calls_per_s
    print(f"redis batched / memory, calls/s        {ratio:6.2f} x")
    print(f"redis batched - memory, CPU us/call    {batched.cpu_us - mem.cpu_us:+6.2f}")
    if args.keys <= 0:
        return
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
    parser.add_argument("--policies", type=int, default=1, help="checks per call (>= 1)")
    parser.add_argument(
        "--work-us", type=float, default=0.0, help="CPU per call outside the limiter (us)"
    )
    parser.add_argument(
        "--spread", type=int, default=1, help="callers yield 1..SPREAD times between calls"
    )
    parser.add_argument("--batched-only", action="store_true", help="skip the unbatched run")
    parser.add_argument("--keys", type=int, default=1_000_000, help="0: no memory-per-key run")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.policies < 1 or args.spread < 1:
        parser.error("--policies and --spread must be >= 1")
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional

        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
