"""Issue 17: a Redis that is behind the snapshot (a promoted replica that missed the
last writes, a restart from an old file) is not empty, so restore never runs: the
snapshot finds its counters below the database's in the same generation and raises
them. An admin reset (a new generation) is not undone.

Each test runs its own redis-server(s), so it may rewrite or promote them at will.
"""

from __future__ import annotations

import pytest

from llm_quota import quota_guard
from llm_quota.exceptions import BudgetExceeded
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.restore import month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import DaySnapshot, UsageSnapshot
from llm_quota.reporting.snapshot import WATERMARK_OVERLAP_MS, snapshot_usage
from llm_quota.rules.accounting import Limits
from tests.support import factories, periods
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
    to a replica that had not received them."""
    now = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if now:
        client.delete(*now)
    for key, (data, ttl) in copy.items():
        client.restore(key, ttl, data)


def ask(user):
    """A request estimated at least 50 + 16 x 4 = 114 base tokens (clamped)."""
    with quota_guard(user, model="gpt-4o", prompt_tokens=50, max_tokens=50) as q:
        q.settle({"prompt_tokens": 50, "completion_tokens": 0})


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
