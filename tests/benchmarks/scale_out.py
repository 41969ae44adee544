"""Section 9: scale-out. The async ledger against the sync one, the event loop under a
burst, and a Redis Cluster with and without global caps (its second step).

The cluster is our own 3 primaries on spare loopback ports (``tests/support/redis_server.py``);
without redis-server/redis-cli that part says so and is left out.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid

from django_redis import get_redis_connection

from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import Limits
from tests.benchmarks.gate_cost import ESTIMATE, USAGE, _drop, five_limits
from tests.benchmarks.measure import Table, per_call, ratio, us

CALLS = 1000
BURST = 256


def _sync(ledger: Ledger, limits: Limits) -> float:
    def call() -> None:
        decision = ledger.reserve(1, limits, ESTIMATE)
        ledger.settle(decision.reservation, USAGE)

    call()  # loads the scripts
    return per_call(call, CALLS)


async def _async_pair(twin: AsyncLedger, limits: Limits) -> float:
    decision = await twin.reserve(1, limits, ESTIMATE)
    await twin.settle(decision.reservation, USAGE)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS):
            decision = await twin.reserve(1, limits, ESTIMATE)
            await twin.settle(decision.reservation, USAGE)
        samples.append((time.perf_counter() - start) / CALLS)
    return statistics.median(samples)


async def _burst(twin: AsyncLedger, limits: Limits) -> tuple[float, float]:
    """BURST concurrent reserve+settle pairs; wall time and the loop's largest gap."""
    gaps: list[float] = []

    async def heartbeat() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    async def one(uid: int) -> None:
        decision = await twin.reserve(uid, limits, ESTIMATE)
        await twin.settle(decision.reservation, USAGE)

    for uid in range(BURST):  # known users: no restore step in the measured burst
        await one(uid)
    beat = asyncio.get_running_loop().create_task(heartbeat())
    start = time.perf_counter()
    await asyncio.gather(*(one(uid) for uid in range(BURST)))
    elapsed = time.perf_counter() - start
    beat.cancel()
    return elapsed, max(gaps, default=0.0)


def _async_figures(ledger: Ledger, limits: Limits) -> tuple[float, float, float]:
    async def measure() -> tuple[float, float, float]:
        twin = AsyncLedger.mirroring(ledger)
        pair = await _async_pair(twin, limits)
        elapsed, gap = await _burst(twin, limits)
        await twin.aclose()
        return pair, elapsed, gap

    return asyncio.run(measure())


def run(table: Table) -> None:
    client = get_redis_connection("default")
    limits = five_limits(10**6)
    ledger = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}")
    try:
        sync_pair = _sync(ledger, limits)
        async_pair, elapsed, gap = _async_figures(ledger, limits)
    finally:
        _drop(client, ledger.keyspace.prefix)
    table.add("9 scale-out", "sync reserve + settle, one at a time", us(sync_pair))
    table.add("9 scale-out", "async reserve + settle, one at a time", us(async_pair),
              ratio(async_pair, sync_pair) + " of sync")  # fmt: skip
    table.add("9 scale-out", f"async: {BURST} reserve + settle at once, per pair",
              us(elapsed / BURST))  # fmt: skip
    table.add("9 scale-out", "async: event loop's largest gap in that burst",
              f"{gap * 1e3:.1f} ms", "the burst's own CPU; no blocking I/O (tested)")  # fmt: skip
    _cluster(table, limits)


def _cluster(table: Table, limits: Limits) -> None:
    from llm_quota.ledger.connections import cluster_client
    from tests.support.redis_server import RedisCluster, binaries

    if binaries() is None:
        table.add("9 scale-out", "Redis Cluster", "skipped", "redis-server/redis-cli not found")
        return
    cluster = RedisCluster().start()
    try:
        client = cluster_client(cluster.url)
        plain = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}")
        capped = Limits(**{**limits.__dict__, "global_tokens_per_day": 10**15})
        one = _sync(plain, limits)
        two = _sync(plain, capped)
        _, elapsed, gap = _async_figures(plain, capped)
        client.close()
    finally:
        cluster.stop()
    table.add("9 scale-out", "cluster: reserve + settle, no global cap (1 + 1 scripts)", us(one))
    table.add("9 scale-out", "cluster: reserve + settle under a global cap (2 + 2)", us(two),
              ratio(two, one) + " of no cap")  # fmt: skip
    table.add("9 scale-out", f"cluster async: {BURST} at once under a global cap, per pair",
              us(elapsed / BURST), f"loop's largest gap {gap * 1e3:.1f} ms")  # fmt: skip
