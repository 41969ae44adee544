"""Section 8: Redis bytes per active user-month (MEMORY USAGE over the user's keys)."""

from __future__ import annotations

import uuid

from django_redis import get_redis_connection

from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price
from llm_quota.rules.periods import current_month


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


#: The breaker's fields in a user's state hash (ledger/lua/burn.lua).
BREAKER_FIELDS = ("bb", "bx", "bp", "bz")


def user_bytes(client, ledger: Ledger, uid: int) -> int:
    base = ledger.keyspace.user(uid)
    total = sum(client.memory_usage(k) or 0 for k in client.scan_iter(match=f"{base}*"))
    index = ledger.keyspace.active_users(current_month(ledger.clock(), "UTC"))
    members = max(client.zcard(index), 1)
    return total + (client.memory_usage(index) or 0) // members


def run(table) -> None:
    client = get_redis_connection("default")
    clock = Clock()
    ledger = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}", clock=clock)
    limits = Limits(
        requests_per_minute=1000,
        tokens_per_minute=10**7,
        tokens_per_day=10**8,
        tokens_per_month=10**9,
        max_concurrent_requests=100,
    )
    users = 200
    for uid in range(users):
        for n in range(30):  # a month's worth of a light user: 30 calls on 3 models
            model = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5")[n % 3]
            estimate = Estimate(Price(model, 1_000_000, 4_000_000), 400, 300)
            decision = ledger.reserve(uid, limits, estimate)
            ledger.settle(decision.reservation, ActualUsage(400, 150))
    busy = sum(user_bytes(client, ledger, uid) for uid in range(users)) / users
    clock.now += 3600  # tombstones (one RESERVATION_TTL) and the minute window age out
    for uid in range(users):
        ledger.usage(uid)
    idle = sum(user_bytes(client, ledger, uid) for uid in range(users)) / users
    # The burn-rate breaker's fields (burn.lua): settle keeps them for every active
    # user, the breaker on or not; "bz" only after a trip, counted here as if paused.
    for uid in range(users):
        client.hset(ledger.keyspace.user_state(uid), "bz", int(clock.now * 1000) + 900_000)
    paused = sum(user_bytes(client, ledger, uid) for uid in range(users)) / users
    for uid in range(users):
        client.hdel(ledger.keyspace.user_state(uid), *BREAKER_FIELDS)
    bare = sum(user_bytes(client, ledger, uid) for uid in range(users)) / users
    for k in client.scan_iter(match=f"{ledger.keyspace.prefix}:*", count=1000):
        client.delete(k)
    table.add(
        "8 memory",
        "bytes per active user-month, within the hour of activity",
        f"{busy:,.0f} B",
        "incl. idempotency tombstones",
    )
    table.add(
        "8 memory",
        "bytes per active user-month, steady state",
        f"{idle:,.0f} B",
        f"< 2 KB: {'met' if idle < 2048 else 'NOT met'}",
    )
    table.add(
        "8 memory",
        "bytes the burn-rate breaker adds per active user (paused: the most)",
        f"{paused - bare:,.0f} B",
        f"< 300 B: {'met' if paused - bare < 300 else 'NOT met'}; idle {idle - bare:,.0f} B",
    )
