"""Section 9: what an API key and a team add to a reserve, against the user alone, in
one run (issue #14's goal: at most 1.2x on one Redis).

On one Redis the key's and the team's limits are reserved in the user's own script
step, so they cost no round trip; what they add is the work inside Redis (each payer's
window, period counters, lease and record) and a few more arguments. Rounds alternate
the ledgers and each ratio is taken per round, so the loopback's drift cancels out.
Where valgrind is installed, the same reserves are also counted in instructions that
Redis executes (``redis_instructions``): the figure a busy machine cannot move.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid

from django_redis import get_redis_connection

from tests.benchmarks import redis_instructions
from tests.benchmarks.gate_cost import ESTIMATE, ROUNDS, USAGE, Clock, _drop, five_limits
from tests.benchmarks.measure import Table, us, verdict

CALLS = 300
RATE = 600


class Pairs:
    """Steady reserve + settle pairs at ``RATE``, with or without a key."""

    def __init__(self, client, with_key: bool, with_team: bool = False) -> None:
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
        if with_team:
            self.limits = dataclasses.replace(
                self.limits, team="1", team_requests_per_minute=RATE * 10,
                team_max_concurrent_requests=10**6, team_tokens_per_day=10**13,
                team_tokens_per_month=10**14,
            )  # fmt: skip
        for _ in range(RATE):
            self.pair()

    def counted_pair(self, client, settle_source: str) -> None:
        """A pair whose reserve goes by EVALSHA (counted) and whose settle by EVAL (not)."""
        ops = self.ledger.ops
        plan = ops.reserve(1, self.limits, ESTIMATE)
        call = next(plan)
        reply = client.evalsha(self.ledger._scripts["reserve"].sha, len(call.keys), *call.keys,
                               *call.args)  # fmt: skip
        try:
            plan.send(reply)
        except StopIteration as done:
            decision = done.value
        settle = ops.settle(decision.reservation, USAGE)
        step = next(settle)
        client.eval(settle_source, len(step.keys), *step.keys, *step.args)

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
    runs = {"user": Pairs(client, False), "key": Pairs(client, True),
            "team": Pairs(client, True, with_team=True)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(ROUNDS):
            for name, pairs in runs.items():
                times[name].append(pairs.round())
    finally:
        for pairs in runs.values():
            pairs.close()
    ratio = statistics.median(k / u for k, u in zip(times["key"], times["user"], strict=True))
    both = statistics.median(t / u for t, u in zip(times["team"], times["user"], strict=True))
    table.add("9 API keys", "reserve, user's 5 limits alone", us(statistics.median(times["user"])))
    table.add(
        "9 API keys",
        "reserve, user's 5 limits + a key's 3, one step",
        f"{ratio:.2f}x",
        f"{us(statistics.median(times['key']))}; <= 1.2x: {verdict(ratio <= 1.2)}",
    )
    table.add(
        "9 API keys",
        "reserve, user's 5 limits + a key's 3 + a team's 4, one step",
        f"{both:.2f}x",
        f"{us(statistics.median(times['team']))}; <= 1.2x: {verdict(both <= 1.2)}",
    )
    if redis_instructions.available():
        instructions(table)


def instructions(table: Table) -> None:
    """Redis' instructions per reserve for each ledger, each on a fresh counted server."""
    from llm_quota.ledger.ops import script_source

    counts = {}
    for name, key, team in (("user", False, False), ("key", True, False), ("team", True, True)):
        with redis_instructions.counted_redis() as (client, zero, total):
            pairs = Pairs(client, key, with_team=team)  # its warm-up is not counted
            zero()
            for _ in range(CALLS):
                pairs.counted_pair(client, script_source("settle"))
            counts[name] = total() / CALLS
    section = "9 API keys"
    table.add(section, "Redis instructions per reserve, user alone (callgrind)",
              f"{counts['user'] / 1000:.0f}k")  # fmt: skip
    for name, what in (("key", "+ a key's 3"), ("team", "+ a key's 3 + a team's 4")):
        ratio = counts[name] / counts["user"]
        table.add(section, f"Redis instructions per reserve, {what}", f"{ratio:.2f}x",
                  f"{counts[name] / 1000:.0f}k")  # fmt: skip
