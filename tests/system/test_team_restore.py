"""Durability of teams: after Redis loses its data, the next decision charged to a team
sees the team's month from its snapshot, restored once (a private redis-server: the
shared Redis is never flushed)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from llm_quota import quota_guard
from llm_quota.exceptions import BudgetExceeded
from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.restore import key_months_from_snapshots, month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.ledger.team_restore import team_month_from_snapshots
from llm_quota.models import Team, TeamMembership, TeamUsageSnapshot
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories, periods

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture
def team_world(private_redis, quota_prefix, clock):
    """A team with a month budget of 1000, two members on a roomy tier, on a Redis we
    may flush, restoring users and teams from the snapshots."""
    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock, restore=month_from_snapshots,
        restore_keys=key_months_from_snapshots, restore_teams=team_month_from_snapshots,
    )  # fmt: skip
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_month=10**6, is_default=True)
    team = Team.objects.create(slug="acme", name="Acme", tier=factories.tier("team"))
    team.tokens_per_month = 1000
    team.save()
    members = [factories.user(), factories.user()]
    for user in members:
        TeamMembership.objects.create(team=team, user=user)
    return ledger, team, members


def ask(user, prompt=50, completion=0, max_tokens=50):
    """One call charged to the user's only team: 50 + 50 x 4 = 250 base tokens reserved."""
    with quota_guard(user, model="gpt-4o", prompt_tokens=prompt, max_tokens=max_tokens) as q:
        q.settle({"prompt_tokens": prompt, "completion_tokens": completion})
        return q


def test_a_teams_month_survives_a_flush_and_refuses_the_next_request(team_world):
    ledger, team, (alice, bob) = team_world
    ask(alice, 100, 100, max_tokens=100)  # 100 + 400 = 500
    ask(bob, 100, 75, max_tokens=100)  # 100 + 300 = 400: the team has used 900 of 1000
    snapshot_usage(ledger=ledger)
    row = TeamUsageSnapshot.objects.get(team=team)
    assert (row.base_tokens, row.requests) == (900, 2)
    assert row.by_member[str(alice.pk)]["base_tokens"] == 500
    assert row.by_model["gpt-4o"]["requests"] == 2

    ledger.client.flushall()
    assert ledger.client.dbsize() == 0

    with pytest.raises(BudgetExceeded) as refused:
        ask(alice)  # 250 does not fit in the 100 left (nor clamped: 50 + 16 x 4 > 100)
    assert refused.value.limit == "team.tokens_per_month"
    usage = ledger.team_usage(team.pk)
    assert usage.tokens_this_month == 900
    assert {m.user_id: m.base_tokens for m in usage.by_member} == {
        str(alice.pk): 500,
        str(bob.pk): 400,
    }
    assert [(m.model, m.requests) for m in usage.by_model] == [("gpt-4o", 2)]


def test_a_team_is_restored_once_per_loss(team_world):
    ledger, team, (alice, _) = team_world
    ask(alice, 100, 100, max_tokens=100)
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()
    _, month = ledger.periods()
    assert ledger.restore_team(team.pk, month) is True
    assert ledger.restore_team(team.pk, month) is False  # seen: nothing added twice
    ask(alice, 10, 0, max_tokens=10)  # reserve finds the team trusted: no third restore
    assert ledger.team_usage(team.pk).tokens_this_month == 500 + 10


def test_without_a_team_snapshot_the_same_loss_would_hand_the_team_a_fresh_budget(team_world):
    """The control: it is the team's snapshot that refuses above."""
    ledger, team, (alice, bob) = team_world
    ask(alice, 100, 100, max_tokens=100)
    ask(bob, 100, 75, max_tokens=100)
    ledger.client.flushall()
    assert ask(alice).decision.allowed
    assert ledger.team_usage(team.pk).tokens_this_month == 50


def test_a_lost_team_is_not_snapshotted_over_its_full_month(team_world):
    ledger, team, (alice, _) = team_world
    ask(alice, 100, 100, max_tokens=100)
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()
    # A settle reaching the team before any reserve restored it (a request in flight):
    # Redis holds a partial month, which the snapshot must not copy.
    ledger.client.hincrby(ledger.keyspace.team_usage(team.pk, ledger.periods()[1]), "base", 7)
    snapshot_usage(ledger=ledger)
    assert TeamUsageSnapshot.objects.get(team=team).base_tokens == 500


def test_reading_a_lost_teams_usage_restores_it_first(team_world):
    """The usage endpoint and the admin show the team's month, not a fresh one."""
    ledger, team, (alice, _) = team_world
    ask(alice, 100, 100, max_tokens=100)
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()
    assert ledger.team_usage(team.pk).tokens_this_month == 500


@pytest.mark.django_db(transaction=True)  # the async ledger reads the database in a thread
def test_the_async_ledger_restores_a_lost_team_too(team_world):
    ledger, team, (alice, _) = team_world
    ask(alice, 100, 100, max_tokens=100)
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()

    async def read():
        twin = AsyncLedger.mirroring(ledger)
        try:
            return await twin.team_usage(team.pk)
        finally:
            await twin.aclose()
            # The restore read the database in sync_to_async's thread: its connection.
            await sync_to_async(connections.close_all)()

    assert asyncio.run(read()).tokens_this_month == 500


def test_a_teams_day_survives_a_flush_and_refuses_the_next_request(team_world, clock):
    """Issue 17: a team that spent most of its day before the loss cannot spend the day
    again, though its month has plenty left."""
    ledger, team, (alice, bob) = team_world
    team.tokens_per_day, team.tokens_per_month = 1000, 10**6
    team.save()
    ask(alice, 100, 100, max_tokens=100)  # 500
    ask(bob, 100, 75, max_tokens=100)  # 400: the team has used 900 of its day's 1000
    snapshot_usage(ledger=ledger)
    row = TeamUsageSnapshot.objects.get(team=team)
    assert (row.day, row.day_base_tokens) == (periods.now(clock).date(), 900)

    ledger.client.flushall()

    with pytest.raises(BudgetExceeded) as refused:
        ask(alice)  # 250 does not fit in the 100 left (nor clamped: 50 + 16 x 4 > 100)
    assert refused.value.limit == "team.tokens_per_day"
    clamped = ask(bob, 20, 20, max_tokens=50)  # 20 + 50 x 4 clamped to 20 + 20 x 4 = 100
    assert clamped.decision.max_tokens == 20
    usage = ledger.team_usage(team.pk)
    assert (usage.tokens_today, usage.tokens_this_month) == (1000, 1000)


def test_a_teams_day_that_is_over_does_not_come_back(team_world, clock):
    """The snapshot's day is yesterday's once the clock passes midnight: after a loss
    the team's month comes back, its day starts afresh (as a user's)."""
    ledger, team, (alice, _) = team_world
    team.tokens_per_day, team.tokens_per_month = 1000, 10**6
    team.save()
    periods.keep_room(clock, days=1)
    ask(alice, 100, 200, max_tokens=200)  # 900 of the day
    snapshot_usage(ledger=ledger)
    clock.advance(86400)
    ledger.client.flushall()

    ask(alice, 100, 200, max_tokens=200)  # the new day's 1000 has room for 900 again
    usage = ledger.team_usage(team.pk)
    assert (usage.tokens_today, usage.tokens_this_month) == (900, 1800)


def test_the_closed_months_row_keeps_its_last_day(team_world, clock):
    """Only the current month's row takes today's counter: the month just closed keeps
    the last day it was copied with."""
    ledger, team, (alice, _) = team_world
    ask(alice, 100, 100, max_tokens=100)
    snapshot_usage(ledger=ledger)
    last_day = periods.now(clock).date()
    clock.set(datetime.combine(periods.next_month_start(clock), time(12), tzinfo=UTC))
    ask(alice, 10, 0, max_tokens=10)
    snapshot_usage(ledger=ledger)
    rows = {r.period: r for r in TeamUsageSnapshot.objects.filter(team=team)}
    closed, current = rows[periods.month_start(clock, back=1)], rows[periods.month_start(clock)]
    assert (closed.day, closed.day_base_tokens, closed.base_tokens) == (last_day, 500, 500)
    assert (current.day, current.day_base_tokens) == (periods.now(clock).date(), 10)
