"""8 processes x 16 threads against one budget: exact admission, zero overspend."""

from __future__ import annotations

import multiprocessing

import pytest
from django.conf import settings

from llm_quota.ledger.sync_driver import Ledger
from tests.system.concurrency_worker import burst

pytestmark = pytest.mark.slow

PROCESSES, THREADS = 8, 16


def run_burst(prefix, limit, prompt, output, settle_at_once, url=None):
    ctx = multiprocessing.get_context("spawn")
    start, settle_now, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=burst,
            args=(
                url or settings.REDIS_URL,
                prefix,
                limit,
                prompt,
                output,
                THREADS,
                start,
                settle_now,
                results,
                settle_at_once,
            ),
        )
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    start.set()
    totals = {"reserved": [], "charged": []}

    def collect(kind):
        # Messages of the two phases interleave across processes: bucket by tag.
        while len(totals[kind]) < PROCESSES:
            tag, value = results.get(timeout=60)
            totals[tag].append(value)

    collect("reserved")
    settle_now.set()
    collect("charged")
    reserved, charged = sum(totals["reserved"]), sum(totals["charged"])
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return reserved, charged


@pytest.mark.slow
def test_parallel_requests_admit_exactly_floor_of_limit_over_estimate(redis_client, quota_prefix):
    limit, prompt, output = 10_000, 100, 137  # estimate 237 -> floor = 42 of 128
    reserved, charged = run_burst(quota_prefix, limit, prompt, output, settle_at_once=False)
    assert reserved == limit // (prompt + output)
    usage = Ledger(redis_client, prefix=quota_prefix).usage(7)
    assert usage.reserved == 0 and usage.in_flight == 0
    assert usage.tokens_this_month == charged <= limit


@pytest.mark.slow
def test_parallel_settling_requests_never_exceed_monthly_budget(redis_client, quota_prefix):
    limit, prompt, output = 5_000, 50, 200
    reserved, charged = run_burst(quota_prefix, limit, prompt, output, settle_at_once=True)
    usage = Ledger(redis_client, prefix=quota_prefix).usage(7)
    assert reserved >= limit // (prompt + output)
    assert usage.tokens_this_month == charged <= limit
    assert usage.reserved == 0
