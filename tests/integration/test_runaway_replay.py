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
from llm_quota.testing.traffic import (
    DAILY_BUDGET,
    DAY,
    LOOP_START,
    pinned_clock,
    replay,
    replay_incident,
    runaway_loop,
    synthetic_week,
)

MONDAY = datetime(2099, 11, 2, tzinfo=UTC).timestamp()


NEW_TIER = Tier()  # a new tier's defaults
DEFAULTS = Limits(
    tokens_per_day=DAILY_BUDGET,
    burn_multiplier=float(NEW_TIER.burn_multiplier),
    burn_floor=NEW_TIER.burn_floor,
    burn_pause=NEW_TIER.burn_pause_seconds,
)
NO_BREAKER = Limits(tokens_per_day=DAILY_BUDGET)


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
    incident = replay_incident(ledger, clock, "7", DEFAULTS)
    assert incident.week.refused == {} and incident.week.trips == []  # 0 false trips
    loop = incident.loop
    assert loop.first_refusal[1] == "burn_rate_exceeded" and len(loop.trips) == 1
    assert incident.seconds_to_stop <= 10
    assert loop.spent <= 0.05 * DAILY_BUDGET
    assert loop.refused == {"burn_rate_exceeded": len(runaway_loop(LOOP_START)) - loop.admitted}


def test_without_the_breaker_the_runaway_spends_the_whole_budget(replayer):
    ledger, clock = replayer
    loop = replay_incident(ledger, clock, "8", NO_BREAKER).loop
    assert loop.first_refusal[1] == "tokens_per_day"
    assert loop.spent > 0.99 * DAILY_BUDGET


def test_a_new_account_with_no_baseline_is_stopped_at_the_floor(replayer):
    ledger, clock = replayer
    loop = replay(ledger, clock, "9", runaway_loop(10 * 3600), DEFAULTS)
    at, limit = loop.first_refusal
    assert limit == "burn_rate_exceeded" and at - 10 * 3600 <= 10
    assert loop.spent <= DEFAULTS.burn_floor + 2 * 1724  # the floor, and what was in flight
