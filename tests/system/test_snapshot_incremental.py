"""Incremental snapshot runs (from the watermark) and the raw upsert they write with.

Time is the ledger's pinned clock: the index stamps each user with their last settle
time and a run starts from the previous run's start, so moving the clock by hand
decides who is "active since". Reads are counted by what a run did (``run.users``,
index entries read) and, on a Redis of our own, by INFO commandstats.
"""

from __future__ import annotations

import io
import multiprocessing
from datetime import UTC, date, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.restore import month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.snapshot import (
    FULL_WALK_EVERY_MS,
    WATERMARK_OVERLAP_MS,
    count_active,
    snapshot_usage,
)
from llm_quota.reporting.snapshot_sql import database, upsert_rows
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support import factories, periods
from tests.support.spend import spend
from tests.system.snapshot_worker import settle_each

pytestmark = pytest.mark.slow

#: Far enough for a user who settled before a run to fall out of the next run's window
#: (which starts ``WATERMARK_OVERLAP_MS`` before that run's start).
LATER = (WATERMARK_OVERLAP_MS + 60_000) / 1000


def table():
    return {
        (r.user_id, r.period, r.model): (r.requests, r.input_tokens, r.output_tokens, r.base_tokens)
        for r in UsageSnapshot.objects.all()
    }


def live(ledger, users):
    """What Redis holds, in the table's shape: what a complete copy must equal."""
    rows = {}
    for user in users:
        usage = ledger.usage(user.pk)
        period = date(int(usage.month[:4]), int(usage.month[4:]), 1)
        for m in usage.by_model:
            key = (user.pk, period, m.model)
            rows[key] = (m.requests, m.input_tokens, m.output_tokens, m.base_tokens)
    return rows


@pytest.mark.django_db
def test_an_incremental_run_reads_only_users_active_since_the_last_run(ledger, clock):
    users = [factories.user() for _ in range(6)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    first = snapshot_usage(ledger=ledger)
    clock.advance(LATER)
    spend(users[2], 7, 1, ledger=ledger)

    again = snapshot_usage(ledger=ledger)

    assert first.full and first.users == 6
    assert not again.full and again.users == 1 and again.rows_written == 1
    assert table() == live(ledger, users)


@pytest.mark.django_db
def test_inactive_users_are_not_read_again(private_redis, quota_prefix, clock):
    """On a Redis of our own: an incremental run sends no per-user read for them."""
    client = private_redis.client()
    ledger = Ledger(client, prefix=quota_prefix, clock=clock)
    users = [factories.user() for _ in range(10)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    snapshot_usage(ledger=ledger)
    clock.advance(LATER)
    spend(users[0], ledger=ledger)
    spend(users[1], ledger=ledger)
    client.config_resetstat()  # our own server: no one else's statistics to lose

    run = snapshot_usage(ledger=ledger, batch_size=3)

    stats = client.info("commandstats")
    assert run.users == 2
    assert stats["cmdstat_hgetall"]["calls"] == 2
    assert stats["cmdstat_hmget"]["calls"] == 2 + 1  # seen and generation; the watermark
    assert table() == live(ledger, users)


@pytest.mark.django_db
def test_a_settle_during_a_run_is_caught_by_the_next_run(ledger, clock):
    users = [factories.user() for _ in range(4)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    snapshot_usage(ledger=ledger)  # the watermark before this test's run

    def meanwhile(done):
        # After the first batch (read, maybe the next one too) every user settles,
        # stamped just after the run started; then the run goes on for a long while
        # (the clock jumps). Those already read are stale in the database.
        if not moved:
            moved.append(True)
            clock.advance(1)
            for user in users:
                spend(user, 1000, 1000, ledger=ledger)
            clock.advance(3 * LATER)

    moved: list[bool] = []
    snapshot_usage(ledger=ledger, batch_size=1, full=True, progress=meanwhile)
    assert moved and table() != live(ledger, users)
    clock.advance(LATER)

    caught = snapshot_usage(ledger=ledger)

    assert not caught.full and caught.users == 4 and caught.rows_written >= 1
    assert table() == live(ledger, users)


@pytest.mark.django_db
def test_settles_from_another_process_during_a_run_are_all_copied_by_the_next(
    private_redis, quota_prefix, clock
):
    client = private_redis.client()
    ledger = Ledger(client, prefix=quota_prefix, clock=clock)
    users = [factories.user() for _ in range(12)]
    for user in users:
        spend(user, ledger=ledger)
    snapshot_usage(ledger=ledger)
    clock.advance(LATER)
    spend(users[0], ledger=ledger)
    url = f"redis://127.0.0.1:{private_redis.port}/0"
    child: list[multiprocessing.Process] = []

    def meanwhile(done):
        # Started after the run's first batch, finished before its last: every settle
        # of the child happens inside the run.
        if not child:
            ids = [user.pk for user in users]
            process = multiprocessing.get_context("spawn").Process(
                target=settle_each, args=(url, quota_prefix, clock() + 1, ids)
            )
            process.start()
            child.append(process)
            process.join(60)
            assert process.exitcode == 0

    snapshot_usage(ledger=ledger, batch_size=1, full=True, progress=meanwhile)
    clock.advance(3 * LATER)

    run = snapshot_usage(ledger=ledger)

    assert not run.full and run.users == 12
    assert table() == live(ledger, users)


@pytest.mark.django_db
def test_without_a_watermark_a_run_walks_the_whole_index(ledger, clock):
    users = [factories.user() for _ in range(5)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    snapshot_usage(ledger=ledger)
    clock.advance(LATER)
    assert snapshot_usage(ledger=ledger).users == 0
    UsageSnapshot.objects.filter(user=users[3]).delete()  # something to notice
    # Redis lost the watermark (with the data it describes, or on its own).
    ledger.client.delete(ledger.keyspace.snapshot_watermark())

    run = snapshot_usage(ledger=ledger)

    assert run.full and run.users == 5 and run.rows_written == 1
    assert table() == live(ledger, users)


@pytest.mark.django_db
def test_a_full_walk_comes_back_regularly_and_on_request(ledger, clock):
    users = [factories.user() for _ in range(3)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    snapshot_usage(ledger=ledger)
    clock.advance(LATER)
    assert count_active(ledger) == 0 and count_active(ledger, full=True) == 3
    assert snapshot_usage(ledger=ledger, full=True).users == 3
    clock.advance(LATER)
    assert not snapshot_usage(ledger=ledger).full
    clock.advance(FULL_WALK_EVERY_MS / 1000)

    run = snapshot_usage(ledger=ledger)

    assert run.full and run.users == 3


@pytest.mark.django_db
def test_a_watermark_ahead_of_the_clock_is_not_trusted(ledger, clock):
    alice = factories.user()
    spend(alice, ledger=ledger)
    clock.advance(LATER)
    snapshot_usage(ledger=ledger)
    clock.advance(-3 * LATER)  # the clock stepped back, far past the overlap
    spend(alice, ledger=ledger)

    run = snapshot_usage(ledger=ledger)

    assert run.full and run.rows_written == 1
    assert table() == live(ledger, [alice])


@pytest.mark.django_db
def test_the_closed_months_last_copy_holds_a_settle_after_the_rollover(ledger, clock):
    alice, bob = factories.user(), factories.user()
    clock.set(datetime(2099, 10, 31, 23, 50, tzinfo=UTC))
    spend(alice, ledger=ledger)
    spend(bob, ledger=ledger)
    in_flight = ledger.reserve(alice.pk, Limits(), factories.estimate(100, 50))
    clock.set(datetime(2099, 10, 31, 23, 59, 50, tzinfo=UTC))
    snapshot_usage(ledger=ledger)  # the last run of October
    clock.set(datetime(2099, 11, 1, 0, 0, 30, tzinfo=UTC))
    ledger.settle(in_flight.reservation, ActualUsage(10, 10))  # charged to October
    clock.set(datetime(2099, 11, 1, 0, 5, tzinfo=UTC))

    run = snapshot_usage(ledger=ledger)

    october = date(2099, 10, 1)
    assert not run.full and run.months == ["209911", "209910"]
    assert run.users == 1 and run.per_month == {"209911": 0, "209910": 1}
    assert table()[(alice.pk, october, "gpt-4o")] == (2, 110, 60, 320)
    assert table()[(bob.pk, october, "gpt-4o")] == (1, 100, 50, 300)


@pytest.mark.django_db
def test_a_user_skipped_as_lost_is_copied_once_restored_without_a_new_settle(
    redis_client, quota_prefix, clock
):
    ledger = Ledger(redis_client, prefix=quota_prefix, clock=clock, restore=month_from_snapshots)
    alice, bob = factories.user(), factories.user()
    spend(bob, ledger=ledger)
    in_flight = ledger.reserve(alice.pk, Limits(), factories.estimate(100, 50))
    spend(alice, ledger=ledger)  # 300
    snapshot_usage(ledger=ledger)
    # Redis loses Alice's keys but not the index; the call in flight then settles.
    for key in redis_client.scan_iter(match=f"{ledger.keyspace.user(alice.pk)}*"):
        redis_client.delete(key)
    ledger.settle(in_flight.reservation, ActualUsage(10, 10))  # 20, stamped now
    clock.advance(LATER)
    assert snapshot_usage(ledger=ledger).lost == 1  # skipped, never copied over
    clock.advance(LATER)
    # Her usage is shown (the API, the admin): the database's figures come back and
    # add to the settle; her index time stays that of the settle, long before.
    assert ledger.usage(alice.pk).settled_this_month == 320
    clock.advance(LATER)

    run = snapshot_usage(ledger=ledger)

    month = periods.month_start(clock)
    assert not run.full and run.users == 1 and run.lost == 0
    assert table()[(alice.pk, month, "gpt-4o")] == (2, 110, 60, 320)
    assert not redis_client.exists(ledger.keyspace.snapshot_lost(periods.month_id(clock)))
    assert snapshot_usage(ledger=ledger).users == 0  # read back once, then forgotten


@pytest.mark.django_db
def test_progress_is_logged_during_a_run(ledger, monkeypatch, caplog):
    monkeypatch.setattr("llm_quota.reporting.snapshot.PROGRESS_EVERY", 0)
    for _ in range(3):
        spend(factories.user(), ledger=ledger)
    with caplog.at_level("INFO", logger="llm_quota"):
        snapshot_usage(ledger=ledger, batch_size=1)
    lines = [r.getMessage() for r in caplog.records if "so far" in r.getMessage()]
    assert lines[-1] == "usage snapshot: 3 users read, 3 rows written so far (0 s)"
    assert len(lines) >= 3


# -- the raw upsert ------------------------------------------------------------------


@pytest.mark.django_db
def test_the_raw_upsert_inserts_changes_and_leaves_equal_rows_untouched():
    alice, bob, carol = factories.user(), factories.user(), factories.user()
    period, before = date(2099, 11, 1), timezone.now() - timedelta(hours=1)
    using = database()
    written = upsert_rows(
        [(alice.pk, "gpt-4o", 1, 10, 20, 90, 0), (bob.pk, "gpt-4o", 2, 20, 40, 180, 0),
         (bob.pk, "o3", 1, 1, 1, 5, 0)],
        period, before, using=using,
    )  # fmt: skip
    assert written == 3
    now = timezone.now()

    written = upsert_rows(
        [(alice.pk, "gpt-4o", 1, 10, 20, 90, 0),  # as stored
         (bob.pk, "gpt-4o", 3, 30, 60, 270, 0),  # changed
         (carol.pk, "gpt-4o", 1, 1, 1, 5, 7)],  # new
        period, now, using=using,
    )  # fmt: skip

    assert written == 2
    stamps = {(r.user_id, r.model): r.updated_at for r in UsageSnapshot.objects.all()}
    assert stamps == {
        (alice.pk, "gpt-4o"): before,
        (bob.pk, "gpt-4o"): now,
        (bob.pk, "o3"): before,
        (carol.pk, "gpt-4o"): now,
    }
    assert table() == {
        (alice.pk, period, "gpt-4o"): (1, 10, 20, 90),
        (bob.pk, period, "gpt-4o"): (3, 30, 60, 270),
        (bob.pk, period, "o3"): (1, 1, 1, 5),
        (carol.pk, period, "gpt-4o"): (1, 1, 1, 5),
    }


@pytest.mark.django_db
def test_the_raw_upsert_takes_its_names_from_the_model_and_its_values_as_parameters():
    from llm_quota.reporting.snapshot_sql import upsert_statement

    sql = upsert_statement(connection)
    quote = connection.ops.quote_name
    assert sql.startswith(f"INSERT INTO {quote(UsageSnapshot._meta.db_table)} (")
    assert f"ON CONFLICT ({quote('user_id')}, {quote('period')}, {quote('model')})" in sql
    # Nothing but placeholders where values go: model names never reach the SQL text.
    owner = factories.user()
    upsert_rows([(owner.pk, "x'); DROP TABLE auth_user; --", 1, 1, 1, 1, 0)],
                date(2099, 11, 1), timezone.now(), using=database())  # fmt: skip
    assert UsageSnapshot.objects.get(user=owner).model == "x'); DROP TABLE auth_user; --"


@pytest.mark.django_db
def test_the_command_copies_users_active_since_the_last_run_or_all_with_full(ledger, clock):
    set_default_ledger(ledger)
    users = [factories.user() for _ in range(3)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    call_command("llm_quota_snapshot", stdout=io.StringIO(), stderr=io.StringIO())
    clock.advance(LATER)
    spend(users[1], ledger=ledger)

    out, err = io.StringIO(), io.StringIO()
    call_command("llm_quota_snapshot", stdout=out, stderr=err)
    assert "(users active since the last run): 1 users read, 1 rows written" in out.getvalue()
    assert "1/1" in err.getvalue()

    out, err = io.StringIO(), io.StringIO()
    call_command("llm_quota_snapshot", "--full", stdout=out, stderr=err)
    assert "(every user): 3 users read, 0 rows written" in out.getvalue()
    assert "3/3" in err.getvalue()
    assert table() == live(ledger, users)


@pytest.mark.django_db
def test_on_a_cluster_incremental_runs_and_lost_users_work_across_primaries(
    cluster_client, quota_prefix, clock
):
    ledger = Ledger(cluster_client, prefix=quota_prefix, clock=clock, restore=month_from_snapshots)
    users = [factories.user() for _ in range(9)]
    for user in users:
        spend(user, ledger=ledger)
    clock.advance(LATER)
    assert snapshot_usage(ledger=ledger).users == 9
    clock.advance(LATER)
    spend(users[4], ledger=ledger)
    # Redis loses another user's keys (their shard of the index stays); a call settles.
    lost = users[7]
    in_flight = ledger.reserve(lost.pk, Limits(), factories.estimate(100, 50))
    for key in [ledger.keyspace.user_state(lost.pk),
                ledger.keyspace.model_usage(lost.pk, periods.month_id(clock))]:  # fmt: skip
        cluster_client.delete(key)
    ledger.settle(in_flight.reservation, ActualUsage(10, 10))
    clock.advance(LATER)

    run = snapshot_usage(ledger=ledger)
    assert not run.full and (run.users, run.lost, run.rows_written) == (2, 1, 1)
    clock.advance(LATER)
    ledger.usage(lost.pk)  # restored: the database's figures plus the settle
    clock.advance(LATER)

    run = snapshot_usage(ledger=ledger)

    assert not run.full and (run.users, run.lost, run.rows_written) == (1, 0, 1)
    assert table() == live(ledger, users)
