"""Section 9: what an API key adds to a reserve, against the user alone, in one run.

The key's limits (rpm, day, month) are reserved in the user's own script step, so a
key costs no round trip; what it adds is the work inside Redis (its window, its
period counters, its share's lease and record). Rounds alternate the two ledgers and
each ratio is taken per round, so the loopback's drift cancels out.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid

from django_redis import get_redis_connection

from tests.benchmarks.gate_cost import ESTIMATE, ROUNDS, USAGE, Clock, _drop, five_limits
from tests.benchmarks.measure import Table, us, verdict

CALLS = 300
RATE = 600


class Pairs:
    """Steady reserve + settle pairs at ``RATE``, with or without a key."""

    def __init__(self, client, with_key: bool) -> None:
        from llm_quota.ledger.sync_driver import Ledger

        self.client = client
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.ledger = Ledger(client, prefix=prefix, clock=Clock(60 / RATE))
        self.limits = five_limits(RATE)
        if with_key:
            self.limits = dataclasses.replace(
                self.limits, api_key="1", key_requests_per_minute=RATE,
                key_tokens_per_day=10**13, key_tokens_per_month=10**14,
            )  # fmt: skip
        for _ in range(RATE):
            self.pair()

    def pair(self) -> float:
        start = time.perf_counter()
        decision = self.ledger.reserve(1, self.limits, ESTIMATE)
        reserved = time.perf_counter() - start
        self.ledger.settle(decision.reservation, USAGE)
        return reserved

    def round(self) -> float:
        return sum(self.pair() for _ in range(CALLS)) / CALLS

    def close(self) -> None:
        _drop(self.client, self.ledger.keyspace.prefix)


def run(table: Table) -> None:
    client = get_redis_connection("default")
    alone, keyed = Pairs(client, False), Pairs(client, True)
    times: dict[str, list[float]] = {"user": [], "key": []}
    try:
        for _ in range(ROUNDS):
            times["user"].append(alone.round())
            times["key"].append(keyed.round())
    finally:
        alone.close()
        keyed.close()
    ratio = statistics.median(k / u for k, u in zip(times["key"], times["user"], strict=True))
    table.add("9 API keys", "reserve, user's 5 limits alone", us(statistics.median(times["user"])))
    table.add(
        "9 API keys",
        "reserve, user's 5 limits + a key's 3, one step",
        f"{ratio:.2f}x",
        f"{us(statistics.median(times['key']))}; <= 1.2x: {verdict(ratio <= 1.2)}",
    )
