"""The issue's numbers, held on a real Redis with a simulated clock: after a synthetic
week of ordinary heavy use (no false trip), the runaway loop is paused within 10 s
having spent at most 5% of the daily budget; without the breaker it spends all of it.
The tier's default breaker settings are the ones tested."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import Tier
from llm_quota.rules.accounting import Limits
from llm_quota.testing.traffic import DAY, pinned_clock, replay, runaway_loop, synthetic_week

BUDGET = 3_000_000  # base tokens a day: the week's 3x day uses 40% of it
MONDAY = datetime(2099, 11, 2, tzinfo=UTC).timestamp()
AFTER_THE_WEEK = 7 * DAY + 10 * 3600  # the next Monday, 10:00


def default(name):
    return Tier._meta.get_field(name).default


DEFAULTS = Limits(
    tokens_per_day=BUDGET,
    burn_multiplier=float(default("burn_multiplier")),
    burn_floor=default("burn_floor"),
    burn_pause=default("burn_pause_seconds"),
)
NO_BREAKER = Limits(tokens_per_day=BUDGET)


@pytest.fixture
def replayer(redis_client, quota_prefix):
    clock = pinned_clock(MONDAY)
    return Ledger(redis_client, prefix=quota_prefix, clock=clock), clock


def test_the_synthetic_week_is_the_same_every_time_and_as_described():
    week = synthetic_week()
    assert week == synthetic_week()
    per_day = [
        sum(c.base_tokens for c in week if d * DAY <= c.at < (d + 1) * DAY) for d in range(7)
    ]
    busy, usual = per_day[2], sorted(per_day[:5])[2]
    assert 2.2 < busy / usual < 3.2  # the 3x day (Wednesday)
    assert max(per_day[5:]) < usual / 2  # weekends are light
    nightly = [c for c in week if (c.at % DAY) < 3 * 3600]
    assert len(nightly) == 7 * 60  # a batch job every night


def test_a_week_of_heavy_use_never_trips_and_the_runaway_after_it_is_paused_in_seconds(replayer):
    ledger, clock = replayer
    week = replay(ledger, clock, "7", synthetic_week(), DEFAULTS)
    assert week.refused == {} and week.trips == []  # 0 false trips
    loop = replay(ledger, clock, "7", runaway_loop(AFTER_THE_WEEK), DEFAULTS)
    at, limit = loop.first_refusal
    assert limit == "burn_rate_exceeded" and len(loop.trips) == 1
    assert at - AFTER_THE_WEEK <= 10
    assert loop.spent <= 0.05 * BUDGET
    assert loop.refused == {"burn_rate_exceeded": len(runaway_loop(AFTER_THE_WEEK)) - loop.admitted}


def test_without_the_breaker_the_runaway_spends_the_whole_budget(replayer):
    ledger, clock = replayer
    replay(ledger, clock, "8", synthetic_week(), NO_BREAKER)
    loop = replay(ledger, clock, "8", runaway_loop(AFTER_THE_WEEK), NO_BREAKER)
    assert loop.first_refusal[1] == "tokens_per_day"
    assert loop.spent > 0.99 * BUDGET


def test_a_new_account_with_no_baseline_is_stopped_at_the_floor(replayer):
    ledger, clock = replayer
    loop = replay(ledger, clock, "9", runaway_loop(10 * 3600), DEFAULTS)
    at, limit = loop.first_refusal
    assert limit == "burn_rate_exceeded" and at - 10 * 3600 <= 10
    assert loop.spent <= DEFAULTS.burn_floor + 2 * 1724  # the floor, and what was in flight
