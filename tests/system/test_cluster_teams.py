"""Teams on a real 3-primary Redis Cluster: a team's counters live in their own slot, so
a team is a second step after the member's own (team_reserve.lua), withdrawn with it
when either refuses; every single-Redis team test holds here too."""

from __future__ import annotations

import inspect

import pytest

from llm_quota.ledger import keys
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.integration import test_payer_burn_rate, test_team_ledger
from tests.support.factories import estimate

pytestmark = pytest.mark.slow

PORTED = [
    name for name, fn in inspect.getmembers(test_team_ledger, inspect.isfunction)
    if name.startswith("test_")
]  # fmt: skip


@pytest.mark.parametrize("case", PORTED)
def test_single_redis_team_behaviour_holds_on_the_cluster(case, cluster_ledger, clock):
    test = getattr(test_team_ledger, case)
    available = {"ledger": cluster_ledger, "clock": clock}
    test(**{name: available[name] for name in inspect.signature(test).parameters})


BURN_PORTED = [
    name for name, fn in inspect.getmembers(test_payer_burn_rate, inspect.isfunction)
    if name.startswith("test_") and "team" in name
]  # fmt: skip


@pytest.mark.parametrize("case", BURN_PORTED)
def test_a_teams_burn_rate_breaker_holds_on_the_cluster(case, cluster_ledger, clock):
    """The team's breaker is checked in team_reserve.lua, its step apart."""
    test = getattr(test_payer_burn_rate, case)
    test(ledger=cluster_ledger, clock=clock)


def test_the_team_lives_in_its_own_slot(cluster_ledger):
    assert keys.cluster_slot(cluster_ledger.keyspace.team(9)) != keys.cluster_slot(
        cluster_ledger.keyspace.user(1)
    )


def test_a_team_refusal_withdraws_the_members_step_and_the_keys_share(cluster_ledger):
    limits = Limits(tokens_per_month=10_000, api_key="4", key_tokens_per_month=10_000,
                    team="9", team_tokens_per_month=500)  # fmt: skip
    assert cluster_ledger.reserve(1, limits, estimate(400, 0)).allowed
    refused = cluster_ledger.reserve(1, limits, estimate(400, 0), clamp=False)
    assert not refused.allowed and refused.limit == "team.tokens_per_month"
    user, key = cluster_ledger.usage(1), cluster_ledger.key_usage(1, "4")
    assert (user.tokens_this_month, user.reserved, user.in_flight) == (400, 400, 1)
    assert (key.tokens_this_month, key.requests_this_minute) == (400, 1)


def test_a_global_refusal_after_the_team_gives_the_team_share_back(cluster_ledger):
    limits = Limits(team="9", team_tokens_per_month=10_000, global_tokens_per_day=500)
    assert cluster_ledger.reserve(1, limits, estimate(400, 0)).allowed
    refused = cluster_ledger.reserve(2, limits, estimate(400, 0), clamp=False)
    assert not refused.allowed and refused.limit == "global_tokens_per_day"
    team = cluster_ledger.team_usage("9")
    assert (team.tokens_this_month, team.reserved, team.in_flight) == (400, 400, 1)
    assert cluster_ledger.usage(2).tokens_this_month == 0


def test_a_team_settled_twice_or_after_release_changes_nothing(cluster_ledger):
    limits = Limits(team="9", team_tokens_per_month=10_000)
    held = cluster_ledger.reserve(1, limits, estimate(100, 100)).reservation
    cluster_ledger.settle(held, ActualUsage(100, 10))
    cluster_ledger.settle(held, ActualUsage(100, 10))
    cluster_ledger.release(held)
    team = cluster_ledger.team_usage("9")
    assert (team.tokens_this_month, team.reserved) == (110, 0)
    assert [m.requests for m in team.by_member] == [1]
