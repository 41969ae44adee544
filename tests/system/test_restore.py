"""Durability: after Redis loses its data, the next decision sees the snapshots' usage.

Each test runs its own redis-server, so it may flush or restart it at will; the
shared Redis is never flushed.
"""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime

import pytest

from llm_quota import quota_guard
from llm_quota.exceptions import BudgetExceeded
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.replies import ModelUsage
from llm_quota.ledger.restore import month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.snapshot import snapshot_usage
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support import factories, periods
from tests.support.redis_server import RedisServer, free_port
from tests.support.spend import spend

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture
def durable(private_redis, quota_prefix, clock):
    """The project's ledger on a Redis we may destroy, restoring from the snapshots."""
    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock, restore=month_from_snapshots
    )
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    tier = factories.tier("free", tokens_per_month=1000, is_default=True)
    return ledger, tier


def ask(user):
    """A request estimated at 50 + 50 x 4 = 250 base tokens (at least 50 + 16 x 4 clamped)."""
    with quota_guard(user, model="gpt-4o", prompt_tokens=50, max_tokens=50) as q:
        q.settle({"prompt_tokens": 50, "completion_tokens": 0})
        return q


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_after_redis_loses_everything_the_next_request_is_refused_by_restored_usage(
    durable, private_redis, loss
):
    ledger, _ = durable
    user = factories.user()
    spend(user, 100, 200, max_tokens=200)  # 100 + 800 = 900 of 1000
    snapshot_usage(ledger=ledger)

    if loss == "flushall":
        ledger.client.flushall()
    else:
        private_redis.restart()  # no persistence: an empty Redis comes back
    assert ledger.client.dbsize() == 0

    with pytest.raises(BudgetExceeded) as refused:
        ask(user)
    assert refused.value.limit == "tokens_per_month"
    usage = ledger.usage(user.pk)
    assert usage.tokens_this_month == 900 and usage.settled_this_month == 900


def test_without_a_snapshot_the_same_loss_would_hand_out_a_fresh_budget(durable):
    """The control: it is the snapshot that refuses above, not something else."""
    ledger, _ = durable
    user = factories.user()
    spend(user, 100, 200, max_tokens=200)
    ledger.client.flushall()
    assert ask(user).decision.allowed


def test_restore_happens_once_and_later_snapshots_keep_the_database_whole(durable, clock):
    ledger, _ = durable
    user = factories.user()
    spend(user, 100, 100, max_tokens=200)  # 500
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()

    ask(user)  # restores 500, then spends 50
    ask(user)  # no second restore: 550 + 50
    assert ledger.usage(user.pk).tokens_this_month == 600
    # The index came back with the counters, so the snapshot still covers the user
    # and writes the sum, not the post-loss part alone.
    index = ledger.keyspace.active_users(periods.month_id(clock))
    assert ledger.client.zscore(index, str(user.pk)) is not None
    snapshot_usage(ledger=ledger)
    row = UsageSnapshot.objects.get(user=user)
    assert (row.requests, row.base_tokens) == (3, 600)


def test_a_settle_arriving_after_the_loss_is_added_to_the_restored_month(durable):
    ledger, _ = durable
    user = factories.user()
    spend(user, 100, 100, max_tokens=200)  # 500
    with quota_guard(user, model="gpt-4o", prompt_tokens=10, max_tokens=10) as in_flight:
        snapshot_usage(ledger=ledger)
        ledger.client.flushall()
        in_flight.settle({"prompt_tokens": 10, "completion_tokens": 10})  # 50, record lost
        # Redis now holds only the late settle; the snapshot must not copy it over.
        assert snapshot_usage(ledger=ledger).lost == 1
        assert UsageSnapshot.objects.get(user=user).base_tokens == 500
    assert ledger.usage(user.pk).tokens_this_month == 550  # restored 500 + the late 50
    snapshot_usage(ledger=ledger)
    assert UsageSnapshot.objects.get(user=user).base_tokens == 550


def test_the_just_closed_month_comes_back_too(private_redis, quota_prefix, clock):
    """Without it, a late settle into last month would leave a partial month that the
    snapshot copies over the full one."""
    clock.set(datetime(2099, 10, 31, 23, 0, tzinfo=UTC))  # future: no real-time expiry
    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock, restore=month_from_snapshots
    )
    user = factories.user()
    done = ledger.reserve(user.pk, Limits(), factories.estimate(100, 100))
    ledger.settle(done.reservation, ActualUsage(100, 100))
    late = ledger.reserve(user.pk, Limits(), factories.estimate(10, 10))
    snapshot_usage(ledger=ledger)
    clock.set(datetime(2099, 11, 1, 0, 5, tzinfo=UTC))
    ledger.client.flushall()
    ledger.settle(late.reservation, ActualUsage(10, 10))  # lands in October

    assert ledger.reserve(user.pk, Limits(), factories.estimate(1, 1)).allowed  # restores
    snapshot_usage(ledger=ledger)

    october = UsageSnapshot.objects.get(user=user, period=date(2099, 10, 1))
    assert (october.requests, october.base_tokens) == (2, 220)


def test_concurrent_first_requests_restore_once(private_redis, quota_prefix, clock):
    calls = []

    def source(uid, month):
        calls.append(month)
        if month != periods.month_id(clock):
            return (0, [])
        return (700, [ModelUsage("gpt-4o", 7, 300, 100, 700)])

    ledger = Ledger(private_redis.client(), prefix=quota_prefix, clock=clock, restore=source)
    results = []

    def first_request():
        d = ledger.reserve(5, Limits(tokens_per_month=1000), factories.estimate(10, 0))
        results.append(d.allowed)

    threads = [threading.Thread(target=first_request) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Several threads may read the database, but only one adds it to Redis.
    assert ledger.usage(5).tokens_this_month == 700 + 10 * sum(results)
    assert sum(results) == 16
    assert ledger.usage(5).by_model[0].requests == 7


def test_a_keys_month_comes_back_with_its_user_and_still_refuses(
    private_redis, quota_prefix, clock
):
    """A key's monthly budget must not start again from zero after a Redis loss."""
    from llm_quota.exceptions import QuotaExceeded
    from llm_quota.ledger.restore import key_months_from_snapshots
    from llm_quota.rules.api_keys import find_key
    from tests.support.api_keys import api_key

    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock,
        restore=month_from_snapshots, restore_keys=key_months_from_snapshots,
    )  # fmt: skip
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_month=10_000, is_default=True)
    user = factories.user()
    key, plaintext = api_key(user, tokens_per_month=600)
    credential = find_key(plaintext)

    def ask_with_key():
        with quota_guard(user, model="gpt-4o", prompt_tokens=50, max_tokens=50,
                         api_key=credential) as q:  # fmt: skip
            q.settle({"prompt_tokens": 50, "completion_tokens": 50})

    ask_with_key()
    ask_with_key()  # 2 x 250 = 500 of the key's 600
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()

    with pytest.raises(QuotaExceeded) as refused:
        ask_with_key()
    assert refused.value.limit == "key.tokens_per_month"
    restored = ledger.key_usage(user.pk, key.pk)
    assert (restored.tokens_this_month, restored.requests) == (500, 2)
    assert ledger.usage(user.pk).tokens_this_month == 500


def test_a_keys_day_comes_back_with_its_user_and_still_clamps(private_redis, quota_prefix, clock):
    """Issue 17: a key that spent most of its day before the loss cannot spend the day
    again: the next request is clamped to what was left, as before the loss."""
    from llm_quota.exceptions import QuotaExceeded
    from llm_quota.ledger.restore import key_months_from_snapshots
    from llm_quota.models import ApiKeyUsageSnapshot
    from llm_quota.rules.api_keys import find_key
    from tests.support.api_keys import api_key

    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock,
        restore=month_from_snapshots, restore_keys=key_months_from_snapshots,
    )  # fmt: skip
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_month=10_000, is_default=True)
    user = factories.user()
    key, plaintext = api_key(user, tokens_per_day=600)
    credential = find_key(plaintext)

    def ask_with_key(prompt=50, max_tokens=50):
        with quota_guard(user, model="gpt-4o", prompt_tokens=prompt, max_tokens=max_tokens,
                         api_key=credential) as q:  # fmt: skip
            q.settle({"prompt_tokens": prompt, "completion_tokens": q.decision.max_tokens})
            return q.decision

    ask_with_key()
    ask_with_key()  # 2 x 250 = 500 of the key's day of 600
    snapshot_usage(ledger=ledger)
    row = ApiKeyUsageSnapshot.objects.get(api_key=key)
    assert (row.day, row.day_base_tokens) == (periods.now(clock).date(), 500)
    ledger.client.flushall()

    assert ask_with_key(prompt=20).max_tokens == 20  # 20 + 20 x 4 = the 100 left
    with pytest.raises(QuotaExceeded) as refused:
        ask_with_key()
    assert refused.value.limit == "key.tokens_per_day"
    restored = ledger.key_usage(user.pk, key.pk)
    assert (restored.tokens_today, restored.tokens_this_month) == (600, 600)


def test_a_lost_users_key_is_not_snapshotted_over_its_full_figures(
    private_redis, quota_prefix, clock
):
    """A settle that reaches Redis after the loss, before any request restored the user,
    leaves the key a partial month and day: the snapshot must not copy them."""
    from llm_quota.ledger.restore import key_months_from_snapshots
    from llm_quota.models import ApiKeyUsageSnapshot
    from tests.support.api_keys import api_key

    ledger = Ledger(
        private_redis.client(), prefix=quota_prefix, clock=clock,
        restore=month_from_snapshots, restore_keys=key_months_from_snapshots,
    )  # fmt: skip
    user = factories.user()
    key, _ = api_key(user)
    limits = Limits(tokens_per_month=10_000, api_key=str(key.pk))
    first = ledger.reserve(user.pk, limits, factories.estimate(300, 0))
    ledger.settle(first.reservation, ActualUsage(300, 0))
    late = ledger.reserve(user.pk, limits, factories.estimate(7, 0))  # in flight at the loss
    snapshot_usage(ledger=ledger)
    ledger.client.flushall()

    ledger.settle(late.reservation, ActualUsage(7, 0))
    snapshot_usage(ledger=ledger)
    row = ApiKeyUsageSnapshot.objects.get(api_key=key)
    assert (row.base_tokens, row.requests, row.day_base_tokens) == (300, 1, 307)


def test_the_day_and_the_global_counters_survive_a_flushall(
    tmp_path, quota_prefix, clock, settings
):
    """Issue 17: a user who spent the day's budget before the loss cannot spend it
    again, and the global caps do not restart from zero."""
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA, "GLOBAL_TOKENS_PER_DAY": 1850, "GLOBAL_TOKENS_PER_MONTH": 10**6,
    }  # fmt: skip
    server = RedisServer(tmp_path, port=free_port()).start()
    try:
        ledger = Ledger(
            server.client(), prefix=quota_prefix, clock=clock, restore=month_from_snapshots
        )
        set_default_ledger(ledger)
        factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
        factories.tier("free", tokens_per_day=1000, tokens_per_month=10**6, is_default=True)
        spender, other, newcomer = factories.user(), factories.user(), factories.user()
        spend(spender, 100, 200, max_tokens=200)  # 900 of the day's 1000
        spend(other, 100, 200, max_tokens=200)  # everyone: 1800 of the day's 1850
        snapshot_usage(ledger=ledger)

        ledger.client.flushall()

        with pytest.raises(BudgetExceeded) as refused:
            ask(spender)  # at least 50 + 16 x 4 = 114 more: over the day's 1000
        assert refused.value.limit == "tokens_per_day"
        with pytest.raises(BudgetExceeded) as refused:
            ask(newcomer)  # a fresh user, but everyone's day is spent
        assert refused.value.limit == "global_tokens_per_day"
        assert ledger.usage(spender.pk).tokens_today == 900
        everyone = ledger.global_usage()
        assert everyone.tokens_today == 1800 and everyone.tokens_this_month == 1800
    finally:
        set_default_ledger(None)
        server.stop()


def test_the_global_counters_survive_a_loss_on_a_cluster_too(
    cluster_client, quota_prefix, clock, settings
):
    """On a cluster the global caps live in a slot of their own, checked by a second
    step (global_reserve.lua): that step restores them from the snapshots too."""
    settings.LLM_QUOTA = {
        **settings.LLM_QUOTA, "GLOBAL_TOKENS_PER_DAY": 1850, "GLOBAL_TOKENS_PER_MONTH": 10**6,
    }  # fmt: skip
    ledger = Ledger(cluster_client, prefix=quota_prefix, clock=clock, restore=month_from_snapshots)
    set_default_ledger(ledger)
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.tier("free", tokens_per_day=1000, tokens_per_month=10**6, is_default=True)
    spender, other, newcomer = factories.user(), factories.user(), factories.user()
    spend(spender, 100, 200, max_tokens=200)  # 900
    spend(other, 100, 200, max_tokens=200)  # everyone: 1800 of the day's 1850
    snapshot_usage(ledger=ledger)

    # The cluster loses this deployment's data (on every primary).
    for key in list(cluster_client.scan_iter(match=f"{quota_prefix}*", count=1000)):
        cluster_client.delete(key)
    assert ledger.global_usage().tokens_today == 0

    with pytest.raises(BudgetExceeded) as refused:
        ask(newcomer)  # a fresh user, but everyone's day is spent
    assert refused.value.limit == "global_tokens_per_day"
    everyone = ledger.global_usage()
    assert everyone.tokens_today == 1800 and everyone.tokens_this_month == 1800
    assert ledger.usage(newcomer.pk).reserved == 0  # the first step was withdrawn
