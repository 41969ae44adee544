"""Sections 1-2: the cost of one gated request, against DRF's throttle and a PING.

Both gates are measured in their steady state at a given rate: a pinned clock moves
60/rate seconds per call, so each call lets the oldest entry leave the window and adds
one. DRF's cost grows with the rate because it pickles its whole history list on every
request; ours reads and updates sorted sets and counters in one script.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from django.core.cache import cache
from django_redis import get_redis_connection
from rest_framework.throttling import UserRateThrottle

from llm_quota.accounting import ActualUsage, Estimate, Limits, Price
from llm_quota.redis_ledger import Ledger
from tests.benchmarks.measure import Table, per_call, ratio, us, verdict

CALLS = 2000
ESTIMATE = Estimate(Price("gpt-4o", 1_000_000, 4_000_000), 500, 200)
USAGE = ActualUsage(500, 120)


class Clock:
    def __init__(self, step: float) -> None:
        self.now, self.step = 1_800_000_000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def five_limits(rate: int) -> Limits:
    return Limits(
        requests_per_minute=rate, tokens_per_minute=10**12, tokens_per_day=10**13,
        tokens_per_month=10**14, max_concurrent_requests=10**6,
    )  # fmt: skip


def ours(client, rate: int, settle: bool) -> float:
    clock = Clock(60 / rate)
    ledger = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}", clock=clock)
    limits = five_limits(rate)

    def call() -> None:
        decision = ledger.reserve(1, limits, ESTIMATE)
        if settle and decision.reservation:
            ledger.settle(decision.reservation, USAGE)

    for _ in range(rate):  # fill the window to the rate
        call()
    try:
        return per_call(call, CALLS)
    finally:
        _drop(client, ledger.keyspace.prefix)


def drf(rate: int) -> float:
    clock = Clock(60 / rate)

    class Throttle(UserRateThrottle):
        timer = clock
        THROTTLE_RATES = {"user": f"{rate}/min"}

    request = SimpleNamespace(user=SimpleNamespace(pk=uuid.uuid4().hex, is_authenticated=True))

    def call() -> None:
        Throttle().allow_request(request, None)

    for _ in range(rate):
        call()
    try:
        return per_call(call, CALLS)
    finally:
        cache.delete(f"throttle_user_{request.user.pk}")


def commands_per_request(client) -> tuple[float, float]:
    """EVALSHA calls per reserve+settle (INFO commandstats) and commands the client sent.

    commandstats also counts the commands a script runs inside Redis, so the round
    trips are counted where they start: at the connection.
    """
    ledger = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}")
    limits = five_limits(10**6)
    warm = ledger.reserve(1, limits, ESTIMATE)
    ledger.settle(warm.reservation, USAGE)
    pairs = 200
    sent = [0]
    conn_class = type(client.connection_pool.get_connection())
    original = conn_class.send_packed_command

    def counting(self, command, check_health=True):
        sent[0] += 1
        return original(self, command, check_health)

    before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    conn_class.send_packed_command = counting
    try:
        for _ in range(pairs):
            ledger.settle(ledger.reserve(1, limits, ESTIMATE).reservation, USAGE)
    finally:
        conn_class.send_packed_command = original
    after = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    _drop(client, ledger.keyspace.prefix)
    return (after - before) / pairs, sent[0] / pairs


def _drop(client, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


def run(table: Table) -> None:
    client = get_redis_connection("default")
    ping = per_call(client.ping, CALLS)
    table.add("1 gate cost", "PING round trip (the floor)", us(ping))
    for rate in (60, 10_000):
        reserve = ours(client, rate, settle=False)
        pair = ours(client, rate, settle=True)
        throttle = drf(rate)
        table.add(
            "1 gate cost",
            f"DRF UserRateThrottle at {rate}/min",
            ratio(throttle, ping),
            us(throttle),
        )
        table.add(
            "1 gate cost",
            f"ours: reserve, 5 limits, at {rate}/min",
            ratio(reserve, ping),
            f"<= 2x PING: {verdict(reserve <= 2 * ping)}",
        )
        table.add(
            "1 gate cost",
            f"ours: reserve + settle at {rate}/min",
            ratio(pair, ping),
            f"<= 4x PING: {verdict(pair <= 4 * ping)}",
        )
        table.add(
            "1 gate cost",
            f"ours reserve+settle vs DRF at {rate}/min",
            ratio(pair, throttle),
            "cheaper at high rates" if rate > 60 else "",
        )
    evalsha, top = commands_per_request(client)
    table.add(
        "2 commands",
        "EVALSHA per gated request (reserve + settle)",
        f"{evalsha:.2f}",
        f"exactly 2: {verdict(evalsha == 2)}",
    )
    table.add(
        "2 commands",
        "commands sent by the client per gated request",
        f"{top:.2f}",
        f"exactly 2: {verdict(top == 2)}",
    )
