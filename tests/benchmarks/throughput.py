"""Section 5: reserve+settle pairs per second from 1 and from 4 processes."""

from __future__ import annotations

import multiprocessing
import os
import time
import uuid

PAIRS = 3000


def _worker(key: str, user: int, start, results) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django_redis import get_redis_connection

    from llm_quota.ledger.sync_driver import Ledger
    from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price

    ledger = Ledger(get_redis_connection("default"), prefix=key)
    limits = Limits(
        requests_per_minute=10**7,
        tokens_per_minute=10**12,
        tokens_per_day=10**13,
        tokens_per_month=10**14,
        max_concurrent_requests=10**6,
    )
    estimate = Estimate(Price("gpt-4o", 1_000_000, 4_000_000), 500, 200)
    ledger.client.ping()
    start.wait()
    began = time.perf_counter()
    for _ in range(PAIRS):
        ledger.settle(ledger.reserve(user, limits, estimate).reservation, ActualUsage(500, 100))
    results.put(time.perf_counter() - began)


def pairs_per_second(processes: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    key = f"bench{uuid.uuid4().hex[:8]}"
    procs = [ctx.Process(target=_worker, args=(key, n, start, results)) for n in range(processes)]
    for p in procs:
        p.start()
    time.sleep(2.0)
    began = time.perf_counter()
    start.set()
    for _ in procs:
        results.get(timeout=300)
    elapsed = time.perf_counter() - began
    for p in procs:
        p.join()
    from django_redis import get_redis_connection

    client = get_redis_connection("default")
    for k in client.scan_iter(match=f"{key}:*", count=1000):
        client.delete(k)
    return processes * PAIRS / elapsed


def run(table) -> None:
    from tests.benchmarks.measure import median_of

    one = median_of(lambda: pairs_per_second(1), runs=3)
    four = median_of(lambda: pairs_per_second(4), runs=3)
    table.add("5 throughput", "reserve+settle pairs/s, 1 process", f"{one:,.0f}/s")
    table.add(
        "5 throughput",
        "reserve+settle pairs/s, 4 processes",
        f"{four:,.0f}/s",
        f"{four / one:.2f}x of 1 process ({os.cpu_count()} cores)",
    )
