"""Sections 1-2: the cost of one gated request, against DRF's throttle and a PING.

Both gates are measured in their steady state at a given rate: a pinned clock moves
60/rate seconds per call, so each call lets the oldest entry leave the window and adds
one. DRF's cost grows with the rate because it pickles its whole history list on every
request; ours reads and updates sorted sets and counters in one script.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
import uuid
from types import SimpleNamespace

from django.core.cache import cache
from django_redis import get_redis_connection
from rest_framework.throttling import UserRateThrottle

from llm_quota.ledger.ops import script_source
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price
from tests.benchmarks.measure import Table, per_call, us, verdict

CALLS = 300
ROUNDS = 9
#: The breaker's share is a few per cent: many short rounds, so drift averages out.
BREAKER_ROUNDS, BREAKER_CALLS_PER_ROUND = 41, 100
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


def with_breaker(limits: Limits) -> Limits:
    """The burn-rate breaker on, with a floor never reached: every step of the check
    runs, and no call is refused."""
    return dataclasses.replace(limits, burn_multiplier=10, burn_floor=10**15, burn_pause=900)


#: The breaker's call lines in reserve.lua and settle.lua (burn.lua's functions stay
#: defined, uncalled): taking them out gives the scripts as they were before it.
BREAKER_LINES = {
    "reserve": (re.compile(r"local tripped = burn_check\(.*?, r\)\n", re.S), "local tripped = 0\n"),
    "settle": (re.compile(r"burn_settled\(B, now\)\n"), ""),
}


def without_breaker(ledger: Ledger, client) -> Ledger:
    """``ledger`` running the scripts minus the breaker's calls (today's cost before it)."""
    for name, (pattern, replacement) in BREAKER_LINES.items():
        source, found = pattern.subn(replacement, script_source(name))
        assert found == 1, f"the breaker's call is no longer in {name}.lua"
        ledger._scripts[name] = client.register_script(source)
    return ledger


class Ours:
    """Steady reserve + settle pairs at ``rate``; the reserve is also timed alone.

    Reserve is timed inside the pairs rather than in a loop of reserves: unsettled
    reservations are what a crashed worker leaves, and once their leases run out
    each reserve would also be giving one back. ``breaker``: None as configured by
    default (off in ``five_limits``), True on, False with its calls taken out.
    """

    def __init__(self, client, rate: int, breaker: bool | None = None) -> None:
        self.client = client
        self.ledger = Ledger(client, prefix=f"bench{uuid.uuid4().hex[:8]}", clock=Clock(60 / rate))
        self.limits = five_limits(rate)
        if breaker:
            self.limits = with_breaker(self.limits)
        elif breaker is False:
            without_breaker(self.ledger, client)
        for _ in range(rate):  # fill the window to the rate
            self.pair()

    def pair(self) -> float:
        start = time.perf_counter()
        decision = self.ledger.reserve(1, self.limits, ESTIMATE)
        reserved = time.perf_counter() - start
        self.ledger.settle(decision.reservation, USAGE)
        return reserved

    def round(self, calls: int) -> tuple[float, float]:
        """Mean seconds per reserve and per reserve + settle."""
        start = time.perf_counter()
        reserving = sum(self.pair() for _ in range(calls))
        return reserving / calls, (time.perf_counter() - start) / calls

    def close(self) -> None:
        _drop(self.client, self.ledger.keyspace.prefix)


class Drf:
    def __init__(self, rate: int) -> None:
        clock = Clock(60 / rate)

        class Throttle(UserRateThrottle):
            timer = clock
            THROTTLE_RATES = {"user": f"{rate}/min"}

        self.throttle = Throttle
        self.request = SimpleNamespace(
            user=SimpleNamespace(pk=uuid.uuid4().hex, is_authenticated=True)
        )
        for _ in range(rate):
            self.call()

    def call(self) -> None:
        self.throttle().allow_request(self.request, None)

    def close(self) -> None:
        cache.delete(f"throttle_user_{self.request.user.pk}")


def interleaved(client, rate: int) -> dict[str, float]:
    """Medians over rounds that each time a PING, our pair and DRF's throttle in turn.

    The ratios are per round, then the median: this VM's loopback drifts between
    about 30 and 70 µs per PING within minutes, and a baseline measured minutes apart
    from the thing it divides would measure the drift.
    """
    ours, drf = Ours(client, rate), Drf(rate)
    rows: dict[str, list[float]] = {k: [] for k in ("ping", "reserve", "pair", "drf")}
    try:
        for _ in range(ROUNDS):
            rows["ping"].append(per_call(client.ping, CALLS, runs=1))
            reserve, pair = ours.round(CALLS)
            rows["reserve"].append(reserve)
            rows["pair"].append(pair)
            rows["drf"].append(per_call(drf.call, CALLS, runs=1))
    finally:
        ours.close()
        drf.close()
    out = {k: statistics.median(v) for k, v in rows.items()}
    for k in ("reserve", "pair", "drf"):
        out[f"{k}/ping"] = statistics.median(
            a / b for a, b in zip(rows[k], rows["ping"], strict=True)
        )
    out["pair/drf"] = statistics.median(
        a / b for a, b in zip(rows["pair"], rows["drf"], strict=True)
    )
    return out


def breaker_cost(client, rate: int) -> dict[str, float]:
    """The breaker's share of a reserve and a pair, against the same scripts minus its
    calls, in the same run: short rounds alternate the two, in turn first (the VM's
    drift within a round then favours neither), ratios per round, then medians."""
    on, off = Ours(client, rate, breaker=True), Ours(client, rate, breaker=False)
    ratios: dict[str, list[float]] = {"reserve": [], "pair": []}
    try:
        for n in range(BREAKER_ROUNDS):
            first, second = (on, off) if n % 2 == 0 else (off, on)
            a, b = first.round(BREAKER_CALLS_PER_ROUND), second.round(BREAKER_CALLS_PER_ROUND)
            (reserve_on, pair_on), (reserve_off, pair_off) = (a, b) if first is on else (b, a)
            ratios["reserve"].append(reserve_on / reserve_off)
            ratios["pair"].append(pair_on / pair_off)
    finally:
        on.close()
        off.close()
    return {k: statistics.median(v) for k, v in ratios.items()}


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
    for rate in (60, 10_000):
        m = interleaved(client, rate)
        if rate == 60:
            table.add("1 gate cost", "PING round trip (the floor)", us(m["ping"]),
                      f"median of {ROUNDS} rounds, each ratio per round")  # fmt: skip
        table.add(
            "1 gate cost",
            f"DRF UserRateThrottle at {rate}/min",
            f"{m['drf/ping']:.2f}x",
            us(m["drf"]),
        )
        table.add(
            "1 gate cost",
            f"ours: reserve, 5 limits, at {rate}/min",
            f"{m['reserve/ping']:.2f}x",
            f"{us(m['reserve'])}; <= 2x PING: {verdict(m['reserve/ping'] <= 2)}",
        )
        table.add(
            "1 gate cost",
            f"ours: reserve + settle at {rate}/min",
            f"{m['pair/ping']:.2f}x",
            f"{us(m['pair'])}; <= 4x PING: {verdict(m['pair/ping'] <= 4)}",
        )
        table.add(
            "1 gate cost",
            f"ours reserve+settle vs DRF at {rate}/min",
            f"{m['pair/drf']:.2f}x",
            "cheaper at high rates" if rate > 60 else "",
        )
    for rate in (60, 10_000):
        cost = breaker_cost(client, rate)
        for step in ("reserve", "pair"):
            what = "reserve" if step == "reserve" else "reserve + settle"
            table.add(
                "1 gate cost",
                f"burn-rate breaker on vs its calls taken out: {what} at {rate}/min",
                f"{cost[step]:.2f}x",
                f"<= 1.1x: {verdict(cost[step] <= 1.1)}",
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
