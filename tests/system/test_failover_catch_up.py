"""Issue 17: a Redis that is behind the snapshot (a promoted replica that missed the
last writes, a restart from an old file) is not empty, so restore never runs: the
snapshot finds its counters below the database's in the same generation and raises
them, a user's, an API key's, a team's and the global caps'. An admin reset (a new
generation) is not undone.

Each test runs its own redis-server(s), so it may rewrite or promote them at will.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from llm_quota import quota_guard
from llm_quota.exceptions import BudgetExceeded, QuotaExceeded
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.restore import key_months_from_snapshots, month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.ledger.team_restore import team_month_from_snapshots
from llm_quota.models import (
    ApiKeyUsageSnapshot,
    DaySnapshot,
    Team,
    TeamMembership,
    TeamUsageSnapshot,
    UsageSnapshot,
)
from llm_quota.reporting.snapshot import WATERMARK_OVERLAP_MS, snapshot_usage
from llm_quota.rules.accounting import ActualUsage, Limits
from llm_quota.rules.api_keys import find_key
from tests.support import factories, periods
from tests.support.api_keys import api_key
from tests.support.redis_server import RedisServer, free_port, wait_for
from tests.support.spend import spend

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

#: Far enough apart that an incremental run would not read a user active only before.
LATER = (WATERMARK_OVERLAP_MS + 60_000) / 1000


@pytest.fixture
def durable(private_redis, quota_prefix, clock):
    """The project's ledger on a Redis of our own, restoring from the snapshots; a tier
    of 1000 base tokens a day."""
    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock, restore=month_from_snapshots
    )
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_day=1000, tokens_per_month=10**6, is_default=True)
    return ledger


def copy_of(client, prefix):
    """Every key of this test as it is now: what a replica that stops here would hold."""
    return {
        key: (client.dump(key), max(client.pttl(key), 0))
        for key in client.scan_iter(match=f"{prefix}*", count=1000)
    }


def go_back_to(client, prefix, copy):
    """The data set becomes ``copy``: the writes made since are lost, as on a failover
    to a replica that had not received them. (Key by key: on a cluster they are in
    many slots.)"""
    for key in list(client.scan_iter(match=f"{prefix}*", count=1000)):
        client.delete(key)
    for key, (data, ttl) in copy.items():
        client.restore(key, ttl, data)


def ask(user, prompt=50, api_key=None):
    """A request estimated at least ``prompt`` + 16 x 4 base tokens (clamped)."""
    with quota_guard(
        user, model="gpt-4o", prompt_tokens=prompt, max_tokens=50, api_key=api_key
    ) as q:
        q.settle({"prompt_tokens": prompt, "completion_tokens": 0})


def test_counters_a_failover_lost_are_raised_to_the_snapshot_once(durable, quota_prefix):
    ledger = durable
    user = factories.user()
    spend(user, 100, 50, max_tokens=200)  # 300
    replica = copy_of(ledger.client, quota_prefix)
    spend(user, 200, 100, max_tokens=200)  # 600 more: 900 of the day's 1000
    snapshot_usage(ledger=ledger)

    go_back_to(ledger.client, quota_prefix, replica)
    # The stale copy would hand the 600 out again: 300 of 1000 spent, and trusted.
    stale = ledger.usage(user.pk)
    assert (stale.tokens_today, stale.tokens_this_month) == (300, 300)

    run = snapshot_usage(ledger=ledger)

    assert (run.raised_users, run.raised_tokens) == (1, 600)
    usage = ledger.usage(user.pk)
    assert (usage.tokens_today, usage.tokens_this_month, usage.settled_this_month) == (
        900, 900, 900,
    )  # fmt: skip
    assert [(m.requests, m.input_tokens, m.output_tokens, m.base_tokens)
            for m in usage.by_model] == [(2, 300, 150, 900)]  # fmt: skip
    row = UsageSnapshot.objects.get(user=user)
    assert (row.requests, row.base_tokens) == (2, 900)  # never lowered to the stale 300
    assert DaySnapshot.objects.get(user=user).base_tokens == 900
    with pytest.raises(BudgetExceeded) as refused:
        ask(user)
    assert refused.value.limit == "tokens_per_day"

    # Run again, or raised by hand again: max(current, snapshot), never added twice.
    assert snapshot_usage(ledger=ledger).raised_users == 0
    month = periods.month_id(ledger.clock)
    assert ledger.raise_to_snapshot(user.pk, 0, month, {"base|gpt-4o": 900}) == 0
    assert ledger.usage(user.pk).tokens_this_month == 900


def test_usage_settled_after_the_failover_is_not_counted_twice(durable, quota_prefix):
    """The raise takes each field to max(Redis, snapshot), never Redis + what is
    missing: what the promoted replica settles before the check fills the gap first
    (the documented bound), and nothing is charged twice."""
    ledger = durable
    user = factories.user()
    spend(user, 100, 50, max_tokens=200)  # 300
    replica = copy_of(ledger.client, quota_prefix)
    spend(user, 200, 100, max_tokens=200)  # 900
    snapshot_usage(ledger=ledger)
    go_back_to(ledger.client, quota_prefix, replica)

    spend(user, 50, 25, max_tokens=200)  # 150 on the promoted replica: 450 there
    run = snapshot_usage(ledger=ledger)

    assert (run.raised_users, run.raised_tokens) == (1, 450)
    assert ledger.usage(user.pk).tokens_this_month == 900  # the snapshot, not 1,350


def test_an_admin_reset_is_not_raised_back_but_writes_lost_after_it_are(durable, quota_prefix):
    ledger = durable
    user = factories.user()
    spend(user, 200, 100, max_tokens=200)  # 600
    snapshot_usage(ledger=ledger)  # the database: 600
    reset = ledger.reset_period(user.pk)  # forgiven in Redis; the database still says 600

    run = snapshot_usage(ledger=ledger)

    # Another generation: Redis' 0 is a reset, not lost writes.
    assert run.raised_users == 0
    assert ledger.usage(user.pk).tokens_this_month == 0
    row = UsageSnapshot.objects.get(user=user)
    assert (row.base_tokens, row.generation) == (0, reset.generation)
    assert reset.generation > 0

    # In the new generation, writes a failover loses are raised as before.
    replica = copy_of(ledger.client, quota_prefix)
    spend(user, 100, 50, max_tokens=200)  # 300 after the reset
    snapshot_usage(ledger=ledger)
    go_back_to(ledger.client, quota_prefix, replica)
    run = snapshot_usage(ledger=ledger)
    assert (run.raised_users, run.raised_tokens) == (1, 300)
    assert ledger.usage(user.pk).tokens_this_month == 300


def test_a_promoted_replica_is_caught_up_for_users_an_incremental_run_would_skip(
    tmp_path, quota_prefix, clock
):
    """A real replica promoted while behind: its replication id is new, so the next run
    reads every user (the index's and the database's), not only the recently active."""
    primary = RedisServer(tmp_path / "primary", port=free_port()).start()
    replica = RedisServer(tmp_path / "replica", port=free_port(), replica_of=primary).start()
    old, new = primary.client(), replica.client()
    try:
        ledger = Ledger(old, prefix=quota_prefix, clock=clock, restore=month_from_snapshots)
        early, idle = factories.user(), factories.user()
        spend(early, 100, 50, ledger=ledger)  # 300, then quiet
        # idle's counters are trusted (restored once) but it has not settled this month.
        held = ledger.reserve(idle.pk, Limits(), factories.estimate(10, 10))
        ledger.release(held.reservation)
        clock.advance(LATER)
        snapshot_usage(ledger=ledger)
        wait_for(
            lambda: (
                new.info("replication")["master_repl_offset"]
                == old.info("replication")["master_repl_offset"]
            ),
            "the replica to catch up",
        )
        new.replicaof("NO", "ONE")  # it stops here: every later write misses it

        clock.advance(LATER)
        spend(early, 200, 100, ledger=ledger)  # 600 more
        spend(idle, 100, 50, ledger=ledger)  # 300
        snapshot_usage(ledger=ledger)  # the database has both
        clock.advance(LATER)

        # The failover: the same deployment now talks to the promoted replica.
        promoted = Ledger(new, prefix=quota_prefix, clock=clock, restore=month_from_snapshots)
        assert promoted.usage(early.pk).tokens_this_month == 300
        run = snapshot_usage(ledger=promoted)

        assert run.replication_changed and run.full
        assert (run.raised_users, run.raised_tokens) == (2, 900)
        assert promoted.usage(early.pk).tokens_this_month == 900
        assert promoted.usage(idle.pk).tokens_this_month == 300
        assert not snapshot_usage(ledger=promoted).replication_changed  # once
    finally:
        primary.stop()
        replica.stop()


# -- API keys, teams and the global caps -------------------------------------------------


@pytest.fixture
def payers(private_redis, quota_prefix, clock):
    """The project's ledger on a Redis of our own, restoring users, keys and teams from
    the snapshots; a roomy tier, so that the key's or the team's day is what refuses."""
    ledger = payer_ledger(private_redis.client(), quota_prefix, clock)
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_month=10**6, is_default=True)
    return ledger


def payer_ledger(client, prefix, clock):
    return Ledger(
        client, prefix=prefix, clock=clock, restore=month_from_snapshots,
        restore_keys=key_months_from_snapshots, restore_teams=team_month_from_snapshots,
    )  # fmt: skip


def team_of(*members, tokens_per_day=1000):
    team = Team.objects.create(
        slug=f"team{Team.objects.count()}", name="Acme", tier=factories.tier(),
        tokens_per_day=tokens_per_day,
    )  # fmt: skip
    for user in members:
        TeamMembership.objects.create(team=team, user=user)
    return team


def test_a_keys_counters_a_failover_lost_are_raised_and_refuse_by_its_day(payers, quota_prefix):
    ledger = payers
    user = factories.user()
    key, plaintext = api_key(user, tokens_per_day=1000)
    credential = find_key(plaintext)

    def spend_key(prompt, completion):
        with quota_guard(
            user, model="gpt-4o", prompt_tokens=prompt, max_tokens=200, api_key=credential
        ) as q:
            q.settle({"prompt_tokens": prompt, "completion_tokens": completion})

    spend_key(100, 50)  # 300
    replica = copy_of(ledger.client, quota_prefix)
    spend_key(200, 100)  # 600 more: 900 of the key's 1000
    snapshot_usage(ledger=ledger)

    go_back_to(ledger.client, quota_prefix, replica)
    stale = ledger.key_usage(user.pk, key.pk)
    assert (stale.tokens_today, stale.tokens_this_month) == (300, 300)

    run = snapshot_usage(ledger=ledger)

    assert run.raised_keys == 1
    raised = ledger.key_usage(user.pk, key.pk)
    assert (raised.tokens_today, raised.tokens_this_month) == (900, 900)
    assert (raised.requests, raised.input_tokens, raised.output_tokens) == (2, 300, 150)
    row = ApiKeyUsageSnapshot.objects.get(api_key=key)
    assert (row.requests, row.base_tokens, row.day_base_tokens) == (2, 900, 900)
    with pytest.raises(QuotaExceeded) as refused:
        ask(user, api_key=credential)
    assert refused.value.limit == "key.tokens_per_day"

    # Run again: max(current, snapshot), never added twice.
    assert snapshot_usage(ledger=ledger).raised_keys == 0
    assert ledger.key_usage(user.pk, key.pk).tokens_this_month == 900


def test_a_teams_counters_a_failover_lost_are_raised_and_refuse_by_its_day(payers, quota_prefix):
    ledger = payers
    alice, bob = factories.user(), factories.user()
    team = team_of(alice, bob)
    spend(alice, 100, 50, max_tokens=200)  # 300, charged to the team
    replica = copy_of(ledger.client, quota_prefix)
    spend(bob, 200, 100, max_tokens=200)  # 600 more: 900 of the team's 1000
    snapshot_usage(ledger=ledger)

    go_back_to(ledger.client, quota_prefix, replica)
    stale = ledger.team_usage(team.pk)
    assert (stale.tokens_today, stale.tokens_this_month) == (300, 300)

    run = snapshot_usage(ledger=ledger)

    assert run.raised_teams == 1
    raised = ledger.team_usage(team.pk)
    assert (raised.tokens_today, raised.tokens_this_month) == (900, 900)
    assert {m.user_id: m.base_tokens for m in raised.by_member} == {
        str(alice.pk): 300, str(bob.pk): 600,
    }  # fmt: skip
    assert [(m.model, m.requests, m.base_tokens) for m in raised.by_model] == [("gpt-4o", 2, 900)]
    row = TeamUsageSnapshot.objects.get(team=team)
    assert (row.requests, row.base_tokens, row.day_base_tokens) == (2, 900, 900)
    with pytest.raises(QuotaExceeded) as refused:
        ask(alice)  # her own day is far from spent; the team's is not
    assert refused.value.limit == "team.tokens_per_day"

    assert snapshot_usage(ledger=ledger).raised_teams == 0
    assert ledger.team_usage(team.pk).tokens_this_month == 900


def test_a_key_or_team_reset_is_not_raised_back_but_writes_lost_after_it_are(payers, quota_prefix):
    ledger = payers
    user = factories.user()
    team = team_of(user, tokens_per_day=10**6)
    key, _ = api_key(user)
    limits = Limits(api_key=str(key.pk), team=str(team.pk))

    def charge(prompt, completion):
        held = ledger.reserve(user.pk, limits, factories.estimate(prompt, completion))
        ledger.settle(held.reservation, ActualUsage(prompt, completion))

    charge(600, 0)
    snapshot_usage(ledger=ledger)  # the database: 600 each
    ledger.reset_keys(user.pk, [key.pk])  # forgiven in Redis; the rows still say 600
    ledger.reset_team(team.pk)

    run = snapshot_usage(ledger=ledger)

    # Another generation: Redis' 0 is a reset, not lost writes.
    assert (run.raised_keys, run.raised_teams) == (0, 0)
    assert ledger.key_usage(user.pk, key.pk).tokens_this_month == 0
    assert ledger.team_usage(team.pk).tokens_this_month == 0
    key_row, team_row = ApiKeyUsageSnapshot.objects.get(), TeamUsageSnapshot.objects.get()
    assert (key_row.base_tokens, team_row.base_tokens) == (0, 0)
    assert key_row.generation > 0 and team_row.generation > 0

    # In the new generation, writes a failover loses are raised as before.
    replica = copy_of(ledger.client, quota_prefix)
    charge(300, 0)
    snapshot_usage(ledger=ledger)
    go_back_to(ledger.client, quota_prefix, replica)
    run = snapshot_usage(ledger=ledger)
    assert (run.raised_keys, run.raised_teams) == (1, 1)
    assert ledger.key_usage(user.pk, key.pk).tokens_this_month == 300
    assert ledger.team_usage(team.pk).tokens_this_month == 300


def test_the_global_caps_a_failover_lost_are_raised_and_refuse(payers, quota_prefix, settings):
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA, "GLOBAL_TOKENS_PER_DAY": 1850, "GLOBAL_TOKENS_PER_MONTH": 10**6,
    }  # fmt: skip
    ledger = payers
    set_default_ledger(ledger)  # again: a settings change drops the default ledger
    spender, other, newcomer = factories.user(), factories.user(), factories.user()
    spend(spender, 100, 50, max_tokens=200)  # 300
    replica = copy_of(ledger.client, quota_prefix)
    spend(spender, 200, 100, max_tokens=200)  # 600 more
    spend(other, 100, 200, max_tokens=200)  # everyone: 1800 of the day's 1850
    snapshot_usage(ledger=ledger)

    go_back_to(ledger.client, quota_prefix, replica)
    assert ledger.global_usage().tokens_today == 300

    run = snapshot_usage(ledger=ledger)

    assert run.raised_global == 2  # the day and the month
    everyone = ledger.global_usage()
    assert (everyone.tokens_today, everyone.tokens_this_month) == (1800, 1800)
    with pytest.raises(BudgetExceeded) as refused:
        ask(newcomer)  # a fresh user, but everyone's day is spent
    assert refused.value.limit == "global_tokens_per_day"
    assert snapshot_usage(ledger=ledger).raised_global == 0
    assert ledger.global_usage().tokens_today == 1800


def test_a_promoted_replica_raises_keys_and_teams_its_index_does_not_list(
    tmp_path, quota_prefix, clock
):
    """A real replica promoted while behind: the next run reads the keys the database
    has a row of as well as the index's, and every team, and raises them."""
    primary = RedisServer(tmp_path / "primary", port=free_port()).start()
    replica = RedisServer(tmp_path / "replica", port=free_port(), replica_of=primary).start()
    old, new = primary.client(), replica.client()
    try:
        ledger = payer_ledger(old, quota_prefix, clock)
        user = factories.user()
        team = team_of(user)
        early, late = api_key(user, name="early")[0], api_key(user, name="late")[0]
        on_team = Limits(team=str(team.pk), team_tokens_per_day=1000)

        def charge(key, prompt):
            limits = Limits(api_key=str(key.pk), team=str(team.pk))
            held = ledger.reserve(user.pk, limits, factories.estimate(prompt, 0))
            ledger.settle(held.reservation, ActualUsage(prompt, 0))

        charge(early, 300)
        snapshot_usage(ledger=ledger)
        wait_for(
            lambda: (
                new.info("replication")["master_repl_offset"]
                == old.info("replication")["master_repl_offset"]
            ),
            "the replica to catch up",
        )
        new.replicaof("NO", "ONE")  # it stops here: every later write misses it

        clock.advance(LATER)
        charge(early, 200)
        charge(late, 400)  # its first settle: the replica's index never lists it
        snapshot_usage(ledger=ledger)
        clock.advance(LATER)

        promoted = payer_ledger(new, quota_prefix, clock)
        assert promoted.key_usage(user.pk, late.pk).tokens_this_month == 0
        run = snapshot_usage(ledger=promoted)

        assert run.replication_changed
        assert (run.raised_keys, run.raised_teams) == (2, 1)
        assert promoted.key_usage(user.pk, early.pk).tokens_this_month == 500
        assert promoted.key_usage(user.pk, late.pk).tokens_this_month == 400
        assert promoted.team_usage(team.pk).tokens_this_month == 900
        refused = promoted.reserve(user.pk, on_team, factories.estimate(200, 0), clamp=False)
        assert refused.limit == "team.tokens_per_day"
    finally:
        primary.stop()
        replica.stop()


def test_a_team_and_the_global_caps_are_raised_on_the_cluster(
    cluster_client, quota_prefix, clock, settings
):
    """On a cluster the team and the global caps each live in a slot of their own: the
    raise runs there, a step apart from the users'."""
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA, "GLOBAL_TOKENS_PER_DAY": 2000, "GLOBAL_TOKENS_PER_MONTH": 10**6,
    }  # fmt: skip
    ledger = payer_ledger(cluster_client, quota_prefix, clock)
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_month=10**6, is_default=True)
    member, other, newcomer = factories.user(), factories.user(), factories.user()
    team = team_of(member)
    spend(member, 100, 50, max_tokens=200)  # 300, charged to the team
    spend(other, 100, 50, max_tokens=200)  # 300: everyone 600
    replica = copy_of(cluster_client, quota_prefix)
    spend(member, 200, 100, max_tokens=200)  # 600 more: the team's 900 of 1000
    spend(other, 200, 100, max_tokens=200)  # everyone: 1800 of 2000
    snapshot_usage(ledger=ledger)

    go_back_to(cluster_client, quota_prefix, replica)
    assert ledger.team_usage(team.pk).tokens_today == 300
    assert ledger.global_usage().tokens_today == 600

    run = snapshot_usage(ledger=ledger)

    assert (run.raised_teams, run.raised_global) == (1, 2)
    assert ledger.team_usage(team.pk).tokens_today == 900
    assert ledger.global_usage().tokens_today == 1800
    with pytest.raises(QuotaExceeded) as refused:
        ask(member)  # at least 114 more: over the team's 1000
    assert refused.value.limit == "team.tokens_per_day"
    with pytest.raises(BudgetExceeded) as refused:
        ask(newcomer, prompt=250)  # at least 314 more: over everyone's 2000
    assert refused.value.limit == "global_tokens_per_day"
    assert ledger.usage(newcomer.pk).reserved == 0  # the first step was withdrawn


def test_an_abandoned_reservation_in_a_users_day_does_not_raise_the_global_day(
    payers, clock, settings
):
    """A user's day counter keeps a crashed call's estimate until the user's own next
    script gives it back; the global share has given it back already. The global day
    is raised by no more than the month was (here: nothing was lost), so that estimate
    is never charged to everyone."""
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "GLOBAL_TOKENS_PER_DAY": 10**6}
    ledger = payers
    capped = Limits(global_tokens_per_day=10**6)
    user = factories.user()
    held = ledger.reserve(user.pk, capped, factories.estimate(100, 0))
    ledger.settle(held.reservation, ActualUsage(100, 0))
    ledger.reserve(user.pk, capped, factories.estimate(500, 0))  # its worker dies
    clock.advance(700)  # past RESERVATION_TTL: the lease has run out
    assert ledger.global_usage().tokens_today == 100  # the global share is given back

    run = snapshot_usage(ledger=ledger)

    assert DaySnapshot.objects.get(user=user).base_tokens == 600  # still held there
    assert run.raised_global == 0
    assert ledger.global_usage().tokens_today == 100


def test_a_closed_month_past_its_grace_is_left_to_the_database(payers, clock, monkeypatch):
    # Redis drops a closed month's counters 8 days after its end; from then on its rows
    # are the only record. A team reset this month (a new generation) used to let the
    # next run copy November's empty counters over its row, and every run found each
    # team behind and ran its raise script for nothing.
    ledger = payers
    user = factories.user()
    team = team_of(user, tokens_per_day=10**6)
    held = ledger.reserve(user.pk, Limits(team=str(team.pk)), factories.estimate(600, 0))
    ledger.settle(held.reservation, ActualUsage(600, 0))
    snapshot_usage(ledger=ledger)
    clock.set(datetime(2099, 12, 10, 12, 0, tzinfo=UTC))
    ledger.client.delete(ledger.keyspace.team_usage(team.pk, "209911"))  # expired
    ledger.reset_team(team.pk)
    scripts = []
    raise_team = type(ledger).raise_team
    monkeypatch.setattr(
        type(ledger), "raise_team", lambda self, *a: scripts.append(a) or raise_team(self, *a)
    )

    run = snapshot_usage(ledger=ledger, full=True)

    november = TeamUsageSnapshot.objects.get(team=team, period=date(2099, 11, 1))
    assert november.base_tokens == 600
    assert november.by_member[str(user.pk)]["base_tokens"] == 600
    assert scripts == []
    assert run.months == ["209912"]
