"""Section 3: 64 parallel requests from 4 processes against a limit of 20.

DRF's throttle reads the history, compares, and writes it back: requests that read
before any of them wrote all get in. Our script checks and reserves in one step.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import uuid
from types import SimpleNamespace

PROCESSES, THREADS, LIMIT, RUNS = 4, 16, 20, 5


def _worker(kind: str, key: str, start, results) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django_redis import get_redis_connection
    from rest_framework.throttling import UserRateThrottle

    from llm_quota.ledger.sync_driver import Ledger
    from llm_quota.rules.accounting import Estimate, Limits, Price

    admitted = []
    barrier = threading.Barrier(THREADS)
    client = get_redis_connection("default")
    ledger = Ledger(client, prefix=key)
    estimate = Estimate(Price("gpt-4o", 1_000_000, 1_000_000), 60, 40)  # 100 base tokens

    class Throttle(UserRateThrottle):
        THROTTLE_RATES = {"user": f"{LIMIT}/min"}

    request = SimpleNamespace(user=SimpleNamespace(pk=key, is_authenticated=True))

    def one() -> None:
        barrier.wait()
        if kind == "drf":
            ok = Throttle().allow_request(request, None)
        else:
            ok = ledger.reserve(
                1, Limits(tokens_per_month=LIMIT * 100), estimate, clamp=False
            ).allowed
        if ok:
            admitted.append(1)

    threads = [threading.Thread(target=one) for _ in range(THREADS)]
    client.ping()  # connect before the start line
    start.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(len(admitted))


def burst(kind: str) -> int:
    """How many requests got in over the limit in one burst."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    key = f"bench{uuid.uuid4().hex[:8]}"
    procs = [
        ctx.Process(target=_worker, args=(kind, key, start, results)) for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    import time

    time.sleep(2.0)  # let every process import Django and connect
    start.set()
    total = sum(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    _cleanup(key)
    return total - LIMIT


def _cleanup(key: str) -> None:
    from django.core.cache import cache
    from django_redis import get_redis_connection

    client = get_redis_connection("default")
    cache.delete(f"throttle_user_{key}")
    for k in client.scan_iter(match=f"{key}:*"):
        client.delete(k)


def run(table) -> None:
    drf = [burst("drf") for _ in range(RUNS)]
    ours = [burst("ours") for _ in range(RUNS)]
    table.add(
        "3 burst accuracy",
        f"DRF throttle: admitted over {LIMIT}/min, 64 at once",
        f"+{statistics.median(drf):.0f} (+{statistics.median(drf) / LIMIT:.0%})",
        f"runs: {drf}",
    )
    table.add(
        "3 burst accuracy",
        f"ours: admitted over a budget of {LIMIT}, 64 at once",
        f"+{statistics.median(ours):.0f}",
        f"goal 0 (runs: {ours})",
    )
