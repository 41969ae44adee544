"""64 SDK clients in 4 processes against one user's budget, through the live gateway."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.integration.gateway.sdk_clients_worker import clients
from tests.support import factories
from tests.support.gateway import access_token

PROCESSES, THREADS = 4, 16


@pytest.mark.slow
def test_64_parallel_sdk_clients_never_settle_more_than_the_budget(gateway):
    limit = 3_000
    factories.tier("free", is_default=True, tokens_per_month=limit)
    user = factories.user()
    token = access_token(user)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=clients,
            args=(gateway.base_url, token, "gpt-4o", 20, THREADS, 50, start, results),
        )
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    start.set()
    usages, errors = [], []
    for _ in procs:
        got, failed = results.get(timeout=240)
        usages += got
        errors += failed
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert errors == []
    live = gateway.usage(user)
    charged = sum(prompt + 4 * completion for prompt, completion in usages)  # gpt-4o: 1 in, 4 out
    assert live.tokens_this_month == charged <= limit
    assert live.reserved == 0 and live.in_flight == 0
    # The budget was really contended: most of it went, in many calls.
    assert charged > limit * 0.9 and len(usages) > limit // 100
