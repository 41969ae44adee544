"""The burn-rate breaker for the other payers (contract §11, issue 15): an API key and a
team each keep their own baseline, settled with their usage, and are paused on their own
in the same reserve step as the user (real Redis, pinned clock). The cluster's two-step
version runs the team tests here in tests/system/test_cluster_teams.py."""

from __future__ import annotations

import dataclasses

from llm_quota.rules.accounting import ActualUsage, Limits
from llm_quota.testing.traffic import DAILY_BUDGET, replay, synthetic_week
from tests.integration.test_runaway_replay import DEFAULTS, replayer  # noqa: F401
from tests.support.factories import estimate

#: The user's tier: its breaker also guards the user's API keys.
TIER = Limits(burn_multiplier=10, burn_floor=1_000, burn_pause=600)
#: The same user, calling through API key 7.
KEY = dataclasses.replace(TIER, api_key="7")
#: A team whose tier has a breaker; its members' own breakers are off here.
TEAM = Limits(team="9", team_burn_multiplier=10, team_burn_floor=1_000, team_burn_pause=600)


def spend(ledger, limits, prompt, uid=1):
    """One call: reserve ``prompt`` base tokens and settle them as used."""
    d = ledger.reserve(uid, limits, estimate(prompt, 0), clamp=False)
    if d.allowed:
        ledger.settle(d.reservation, ActualUsage(prompt, 0))
    return d


def busy_user(ledger, clock):
    """Two busy 5-minute buckets of the user's own traffic (no key): 4,000 base tokens
    in a minute, so the user's bar is 40,000 a minute while a new key's is the floor."""
    for _ in range(2):
        for _ in range(10):
            assert spend(ledger, Limits(), 400).allowed  # settle keeps it, breaker or not
        clock.advance(300)


def test_a_runaway_through_one_key_pauses_the_key_and_not_its_user(ledger, clock):
    busy_user(ledger, clock)
    decisions = []
    for _ in range(20):  # a loop through the key: 300 base tokens a second
        decisions.append(spend(ledger, KEY, 300))
        clock.advance(1)
    tripped = next(d for d in decisions if not d.allowed)
    assert tripped.limit == "key.burn_rate_exceeded" and tripped.burn_tripped
    assert tripped.is_budget and tripped.retry_after == 600
    assert sum(d.allowed for d in decisions) == 4  # the fifth finds 1,200 in its minute
    assert not decisions[-1].burn_tripped  # paused already: the trip is reported once
    # The user's own traffic (no key), and another key of theirs, go on.
    assert spend(ledger, TIER, 400).allowed
    assert spend(ledger, dataclasses.replace(TIER, api_key="8"), 100).allowed
    assert not ledger.burn_state(1).paused
    assert ledger.key_burn_state(1, "7").paused
    clock.advance(600)
    assert spend(ledger, KEY, 1).allowed  # the pause ends


def test_a_key_is_paused_by_its_users_tier_only(ledger, clock):
    off = Limits(api_key="7")  # the user's tier has no breaker
    assert all(spend(ledger, off, 300).allowed for _ in range(20))


def test_staff_resume_a_paused_key(ledger, clock):
    busy_user(ledger, clock)
    for _ in range(60):  # bounded: a breaker that never trips fails, not hangs
        if not spend(ledger, KEY, 300).allowed:
            break
        clock.advance(1)
    assert ledger.key_burn_resume(1, "7") is True
    assert ledger.key_burn_resume(1, "7") is False
    assert not ledger.key_burn_state(1, "7").paused
    assert spend(ledger, KEY, 300).allowed  # a minute's grace after a resume


def test_resuming_a_key_never_used_leaves_no_key_without_expiry(ledger):
    assert ledger.key_burn_resume(1, "5") is False
    assert 0 < ledger.client.pttl(ledger.keyspace.api_key(1, "5") + ":s")


def test_members_together_trip_their_teams_breaker(ledger, clock):
    decisions = []
    for _ in range(4):  # three members, 400 each a round: each under the floor
        decisions += [spend(ledger, TEAM, 400, uid=uid) for uid in (1, 2, 3)]
        clock.advance(1)
    refused = [d for d in decisions if not d.allowed]
    assert refused and all(d.limit == "team.burn_rate_exceeded" for d in refused)
    assert sum(d.burn_tripped for d in refused) == 1
    assert decisions.index(refused[0]) == 3  # 1,200 in the team's minute before it
    # Their own traffic outside the team goes on; the team waits out its pause.
    assert spend(ledger, Limits(), 400, uid=1).allowed
    assert ledger.team_burn_state("9").paused
    assert not ledger.burn_state(1).paused
    clock.advance(600)
    assert spend(ledger, TEAM, 1, uid=4).allowed


def test_staff_resume_a_paused_team(ledger, clock):
    for _ in range(60):
        if not spend(ledger, TEAM, 400, uid=1).allowed:
            break
        clock.advance(1)
    assert ledger.team_burn_resume("9") is True
    assert not ledger.team_burn_state("9").paused
    assert spend(ledger, TEAM, 400, uid=2).allowed


def test_a_team_baseline_is_kept_at_settle(ledger, clock):
    for _ in range(2):  # two busy buckets of the team: 4,000 in a minute
        for uid in range(1, 11):
            assert spend(ledger, Limits(team="9"), 400, uid=uid).allowed
        clock.advance(300)
    spend(ledger, TEAM, 1, uid=1)
    assert 3_950 < ledger.team_burn_state("9").baseline_per_minute <= 4_000


def test_a_week_of_heavy_use_through_one_key_never_trips_it(replayer):  # noqa: F811
    ledger, clock = replayer
    week = replay(ledger, clock, "7", synthetic_week(), dataclasses.replace(DEFAULTS, api_key="3"))
    assert week.refused == {} and week.trips == []  # 0 false trips, the key's or the user's
    key = ledger.key_burn_state("7", "3")
    assert not key.paused and key.baseline_per_minute > 0
    assert DEFAULTS.tokens_per_day == DAILY_BUDGET
