"""The pieces of fail-open: breaker states, the per-process limiter, the journal."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from llm_quota.ledger.breaker import CircuitBreaker
from llm_quota.ledger.fallback import FallbackLimiter, OutageJournal, token_share
from llm_quota.ledger.plans import drive
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support.factories import estimate


class Tick:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_on_failure_and_lets_one_probe_through_after_cooldown():
    tick = Tick()
    breaker = CircuitBreaker(cooldown=2.0, clock=tick)
    assert breaker.allow()
    assert breaker.failure() is True  # a new outage
    assert breaker.failure() is False
    assert not breaker.allow() and breaker.retry_after == 2.0
    tick.now += 2.0
    assert breaker.allow() is True  # the probe
    assert breaker.allow() is False  # nobody else while it runs
    breaker.failure()
    tick.now += 1.0
    assert not breaker.allow() and breaker.retry_after == 1.0
    tick.now += 1.0
    assert breaker.allow()
    assert breaker.success() is True and breaker.allow()


def test_fallback_limiter_divides_the_tier_limits():
    tick = Tick()
    limiter = FallbackLimiter(divisor=4, clock=tick)
    limits = Limits(requests_per_minute=20, max_concurrent_requests=8)
    results = []
    for _ in range(6):  # each call finishes before the next
        results.append(limiter.admit("1", limits, estimate(1, 1)))
        limiter.done("1")
    assert results == [None, None, None, None, None, "requests_per_minute"]
    tick.now += 60
    assert limiter.admit("1", limits, estimate(1, 1)) is None


#: Noon on 27 November 2099 (UTC): 720 minutes left in the day, 5,040 in the month.
NOON = datetime(2099, 11, 27, 12, 0, tzinfo=UTC).timestamp()


def test_fallback_limiter_bounds_tokens_by_the_tightest_limit_and_concurrency():
    tick = Tick()
    limiter = FallbackLimiter(divisor=2, clock=tick, wall_clock=lambda: NOON)
    limits = Limits(tokens_per_minute=400, tokens_per_day=720_000, max_concurrent_requests=2)
    assert limiter.admit("1", limits, estimate(100, 50)) is None  # 150 of 400 / 2
    limiter.done("1")
    assert limiter.admit("1", limits, estimate(100, 50)) == "tokens_per_minute"
    assert limiter.admit("2", limits, estimate(10, 10)) is None
    assert limiter.admit("2", limits, estimate(10, 10)) == "max_concurrent_requests"
    limiter.done("2")
    assert limiter.admit("2", limits, estimate(10, 10)) is None


def test_the_blind_share_spreads_each_budget_over_the_minutes_left_in_its_period():
    day, month = Limits(tokens_per_day=720_000), Limits(tokens_per_month=5_040_000)
    assert token_share(day, 2, NOON) == 720_000 // 720 // 2
    assert token_share(month, 2, NOON) == 5_040_000 // 5_040 // 2
    # The least of them, and never more than the minute limit.
    both = Limits(tokens_per_minute=300, tokens_per_day=720_000, tokens_per_month=5_040)
    assert token_share(both, 2, NOON) == 1  # a month of 5,040 over 5,040 minutes
    assert token_share(Limits(tokens_per_minute=300, tokens_per_day=720_000), 2, NOON) == 150
    # What is left of the day grows its share as the day ends: the last minute, all of it.
    last_minute = datetime(2099, 11, 27, 23, 59, 30, tzinfo=UTC).timestamp()
    assert token_share(day, 1, last_minute) == 720_000
    # In the period's own time zone: noon UTC is 7:00 in New York, 17 hours left.
    assert token_share(day, 1, NOON, "America/New_York") == math.ceil(720_000 / (17 * 60))
    assert token_share(Limits(), 2, NOON) is None


def test_a_month_only_tier_no_longer_gets_its_month_per_minute_per_process():
    """The Sentinel test's tier: 150,000 a month and nothing else, three processes. The
    old share was the month itself a minute: 50,000 per process, 200 calls of 250."""
    tick = Tick()
    limiter = FallbackLimiter(divisor=3, clock=tick, wall_clock=lambda: NOON)
    limits = Limits(tokens_per_month=150_000)
    admitted = []
    for _ in range(10):
        admitted.append(limiter.admit("1", limits, estimate(50, 200)) is None)
        limiter.done("1")
    # The share (150,000 / 5,040 minutes / 3 = 10 a minute) is below one call: the
    # floor lets one call a minute through, not zero and not 200.
    assert admitted == [True] + [False] * 9
    tick.now += 60
    assert limiter.admit("1", limits, estimate(50, 200)) is None


def test_journal_replays_in_order_and_keeps_what_fails():
    journal = OutageJournal()
    for n in range(3):
        journal.record(n, ActualUsage(n, n))
    seen = []

    def flaky(reservation, usage):  # a plan with no steps: it only records
        if reservation == 2 and not seen.count("failed"):
            seen.append("failed")
            raise ConnectionError("down again")
        seen.append(reservation)
        return
        yield

    try:
        drive(journal.replay(flaky), lambda step: None)
    except ConnectionError:
        pass
    assert seen == [0, 1, "failed"] and len(journal) == 1
    assert drive(journal.replay(flaky), lambda step: None) == 1
    assert seen[-1] == 2 and len(journal) == 0


def test_journal_is_bounded():
    journal = OutageJournal(max_entries=2)
    for n in range(5):
        journal.record(n, ActualUsage(1, 1))
    assert len(journal) == 2 and journal.dropped == 3


def test_a_blind_call_passes_the_keys_and_the_teams_limits_too():
    """During an outage the key's and the team's limits hold as the user's do, per
    process: a member refused by the team's share is refused for every member, and a
    refusal at one level counts the call at none."""
    tick = Tick()
    limiter = FallbackLimiter(divisor=1, clock=tick, wall_clock=lambda: NOON)
    key = Limits(api_key="7", key_requests_per_minute=2)
    assert [limiter.admit("1", key, estimate(1, 1)) for _ in range(3)] == [
        None, None, "key.requests_per_minute",
    ]  # fmt: skip
    assert limiter.admit("1", Limits(api_key="8"), estimate(1, 1)) is None  # another key
    team = Limits(team="3", team_max_concurrent_requests=2, requests_per_minute=100)
    assert limiter.admit("1", team, estimate(1, 1)) is None
    assert limiter.admit("2", team, estimate(1, 1)) is None
    assert limiter.admit("3", team, estimate(1, 1)) == "team.max_concurrent_requests"
    limiter.done("2", team="3")
    assert limiter.admit("3", team, estimate(1, 1)) is None
    # The team's month spread over the minutes left (5,040 at NOON): one call, then the
    # floor; user 4's own window was not charged by the refusal.
    month = Limits(team="9", team_tokens_per_month=5_040 * 100)
    assert limiter.admit("4", month, estimate(50, 40)) is None
    assert limiter.admit("5", month, estimate(50, 40)) == "team.tokens_per_minute"
    assert limiter.admit("5", Limits(), estimate(50, 40)) is None
