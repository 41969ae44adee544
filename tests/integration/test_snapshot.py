"""The snapshot: Redis usage copied into UsageSnapshot, idempotently, without KEYS."""

from __future__ import annotations

import io
import threading
from datetime import UTC, date, datetime

import pytest
from django.core.management import call_command
from django.db import connections

from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.snapshot import SnapshotBusy, last_run, snapshot_usage
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support import factories, periods
from tests.support.spend import spend


def rows():
    return {
        (r.user_id, r.period, r.model): (r.requests, r.input_tokens, r.output_tokens, r.base_tokens)
        for r in UsageSnapshot.objects.all()
    }


def stamps():
    return {(r.user_id, r.period, r.model): r.updated_at for r in UsageSnapshot.objects.all()}


@pytest.mark.django_db
def test_snapshot_copies_each_users_models_for_current_and_closed_month(ledger, clock):
    # Keys expire by Redis' real clock: a closed month is kept 8 days after its end,
    # so these months lie in the future, where nothing has expired yet.
    alice, bob = factories.user(), factories.user()
    clock.set(datetime(2099, 10, 31, 23, 0, tzinfo=UTC))
    spend(alice, 10, 10, ledger=ledger)  # October: 10 + 40
    clock.set(datetime(2099, 11, 2, 12, 0, tzinfo=UTC))
    spend(alice, 100, 50, ledger=ledger)  # 100 + 200
    spend(alice, 100, 50, ledger=ledger)
    spend(alice, 1000, 100, ledger=ledger, model="gpt-4o-mini", multipliers=(1, 2))  # 1000 + 200
    spend(bob, 7, 3, ledger=ledger)  # 7 + 12

    run = snapshot_usage(ledger=ledger)

    nov, oct = date(2099, 11, 1), date(2099, 10, 1)
    assert run.months == ["209911", "209910"]
    assert rows() == {
        (alice.pk, nov, "gpt-4o"): (2, 200, 100, 600),
        (alice.pk, nov, "gpt-4o-mini"): (1, 1000, 100, 1200),
        (bob.pk, nov, "gpt-4o"): (1, 7, 3, 19),
        (alice.pk, oct, "gpt-4o"): (1, 10, 10, 50),
    }
    assert run.rows_written == 4 and run.users == 3 and run.lost == 0


@pytest.mark.django_db
def test_a_repeated_run_writes_nothing_and_changes_no_row(ledger):
    alice = factories.user()
    spend(alice, ledger=ledger)
    snapshot_usage(ledger=ledger)
    before, written_at = rows(), stamps()

    again = snapshot_usage(ledger=ledger)

    assert again.rows_written == 0
    assert rows() == before and stamps() == written_at


@pytest.mark.django_db
def test_later_runs_write_absolute_values_never_increments(ledger, clock):
    alice = factories.user()
    spend(alice, ledger=ledger)
    snapshot_usage(ledger=ledger)
    spend(alice, ledger=ledger)
    snapshot_usage(ledger=ledger)
    snapshot_usage(ledger=ledger)  # a duplicate beat tick
    assert rows() == {(alice.pk, periods.month_start(clock), "gpt-4o"): (2, 200, 100, 600)}
    assert ledger.usage(alice.pk).settled_this_month == 600


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_give_the_same_rows_as_one(ledger):
    users = [factories.user() for _ in range(30)]
    for i, user in enumerate(users):
        spend(user, 10 + i, i, ledger=ledger)
    errors: list[BaseException] = []

    def run():
        try:
            snapshot_usage(ledger=ledger, batch_size=7)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connections.close_all()  # this thread's own connection

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    concurrent = rows()
    UsageSnapshot.objects.all().delete()
    snapshot_usage(ledger=ledger)
    assert concurrent == rows() and len(concurrent) == 30


@pytest.mark.django_db
def test_a_run_waiting_too_long_for_the_lock_is_refused(ledger):
    lock = ledger.client.lock(ledger.keyspace.snapshot_lock(), timeout=30)
    assert lock.acquire()
    try:
        with pytest.raises(SnapshotBusy):
            snapshot_usage(ledger=ledger, lock_wait=0.2)
    finally:
        lock.release()


@pytest.mark.django_db
def test_a_reset_period_zeroes_the_months_rows(ledger, clock):
    alice = factories.user()
    spend(alice, ledger=ledger)
    spend(alice, ledger=ledger, model="gpt-4o-mini")
    snapshot_usage(ledger=ledger)
    ledger.reset_period(alice.pk)
    spend(alice, 1, 1, ledger=ledger)  # after the reset: 1 + 4

    snapshot_usage(ledger=ledger)

    assert rows() == {
        (alice.pk, periods.month_start(clock), "gpt-4o"): (1, 1, 1, 5),
        (alice.pk, periods.month_start(clock), "gpt-4o-mini"): (0, 0, 0, 0),
    }


@pytest.mark.django_db
def test_a_user_whose_counters_were_lost_is_not_copied_over_the_database(
    ledger, redis_client, clock
):
    alice = factories.user()
    in_flight = ledger.reserve(alice.pk, Limits(), factories.estimate(100, 50))
    spend(alice, ledger=ledger)  # 300
    snapshot_usage(ledger=ledger)
    # Redis loses the user's keys (a failover), not the index; then the call in
    # flight settles: Redis now holds only that one request.
    for key in redis_client.scan_iter(match=f"{ledger.keyspace.user(alice.pk)}*"):
        redis_client.delete(key)
    ledger.settle(in_flight.reservation, ActualUsage(10, 10))

    run = snapshot_usage(ledger=ledger)

    assert run.lost == 1
    assert rows() == {(alice.pk, periods.month_start(clock), "gpt-4o"): (1, 100, 50, 300)}


@pytest.mark.django_db
def test_ids_without_a_user_are_skipped(ledger):
    d = ledger.reserve(987654, Limits(), factories.estimate(1, 1))
    ledger.settle(d.reservation, ActualUsage(1, 1))
    run = snapshot_usage(ledger=ledger)
    assert run.unknown == 1 and rows() == {}


@pytest.mark.django_db
def test_snapshot_reads_without_keys_and_changes_no_counter(private_redis, quota_prefix, clock):
    """On a Redis of our own, INFO commandstats shows exactly what a run sends."""
    client = private_redis.client()
    ledger = Ledger(client, prefix=quota_prefix, clock=clock)
    users = [factories.user() for _ in range(12)]
    for user in users:
        spend(user, ledger=ledger)

    def counters():  # every user's keys and the index
        found = [*client.scan_iter(match=f"{quota_prefix}:{{u:*")]
        found.append(ledger.keyspace.active_users(periods.month_id(clock)))
        return {key: client.dump(key) for key in found}

    before = counters()
    client.config_resetstat()  # our own server: no one else's statistics to lose

    snapshot_usage(ledger=ledger, batch_size=5)

    stats = client.info("commandstats")
    assert stats["cmdstat_zscan"]["calls"] >= 1
    # One pipelined HMGET (seen, generation) + HGETALL per user (and the watermark's
    # HMGET), and no command that moves a counter: nothing was behind to raise.
    assert stats["cmdstat_hgetall"]["calls"] == 12
    assert stats["cmdstat_hmget"]["calls"] == 12 + 1
    for command in ("keys", "incrby", "hincrby", "zadd", "zrem", "eval"):
        assert f"cmdstat_{command}" not in stats
    assert counters() == before


@pytest.mark.django_db
def test_last_run_is_recorded_for_the_admin(ledger, clock):
    clock.set(datetime(2099, 11, 2, 12, 0, tzinfo=UTC))  # October still in its grace
    assert last_run(ledger) is None
    spend(factories.user(), ledger=ledger)
    snapshot_usage(ledger=ledger)
    run = last_run(ledger)
    assert (
        run["users"] == 1
        and run["rows_written"] == 1
        and run["months"] == (f"{periods.month_id(clock)},{periods.month_id(clock, back=1)}")
    )


@pytest.mark.django_db
def test_management_command_runs_the_snapshot_with_a_progress_bar(ledger, clock):
    alice = factories.user()
    spend(alice, ledger=ledger)
    set_default_ledger(ledger)
    out, err = io.StringIO(), io.StringIO()
    call_command("llm_quota_snapshot", stdout=out, stderr=err)
    assert "1 users read, 1 rows written" in out.getvalue()
    assert "snapshot: 100%" in err.getvalue() and "1/1" in err.getvalue()
    assert rows() == {(alice.pk, periods.month_start(clock), "gpt-4o"): (1, 100, 50, 300)}
