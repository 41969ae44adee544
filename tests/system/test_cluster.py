"""The ledger on a real 3-primary Redis Cluster (started by the ``redis_cluster`` fixture).

Per-user scripts stay in the user's slot; global caps live in their own slot and are a
second step that withdraws the first when it refuses. These tests prove that the
guarantees of the single-Redis ledger hold there too.
"""

from __future__ import annotations

import inspect
import multiprocessing

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_quota.ledger import keys
from llm_quota.ledger.ops import ScriptCall
from llm_quota.ledger.resilience import lost_reservation
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.integration import test_ledger
from tests.support import periods
from tests.support.factories import estimate
from tests.system.concurrency_worker import global_burst
from tests.system.test_concurrency import run_burst

pytestmark = pytest.mark.slow

#: Single-Redis ledger tests that hold unchanged on a cluster. (The round-trip test is
#: replaced below: a cluster client routes per key and has no single connection pool.)
PORTED = [
    name
    for name, fn in inspect.getmembers(test_ledger, inspect.isfunction)
    if name.startswith("test_") and name != "test_one_round_trip_to_reserve_and_one_to_settle"
]


def nodes_of(client, names):
    return {client.nodes_manager.get_node_from_slot(keys.cluster_slot(n)).name for n in names}


def users_on_distinct_nodes(ledger, count=3):
    """User ids whose keys land on ``count`` different primaries."""
    found, seen = [], set()
    for uid in range(1, 1000):
        node = nodes_of(ledger.client, [ledger.keyspace.user(uid)]).pop()
        if node not in seen:
            seen.add(node)
            found.append(uid)
        if len(found) == count:
            return found
    raise AssertionError("users do not spread over the cluster")


@pytest.mark.parametrize("case", PORTED)
def test_single_redis_ledger_behaviour_holds_on_the_cluster(
    case, cluster_ledger, cluster_client, quota_prefix, clock
):
    test = getattr(test_ledger, case)
    available = {
        "ledger": cluster_ledger,
        "clock": clock,
        "redis_client": cluster_client,
        "quota_prefix": quota_prefix,
    }
    test(**{name: available[name] for name in inspect.signature(test).parameters})


def test_cluster_client_selects_the_two_step_ledger(cluster_ledger):
    assert cluster_ledger.cluster
    base = cluster_ledger.keyspace.user(42)
    # Settle writes the index in the user's slot: no cross-slot script, no hot key.
    assert keys.cluster_slot(base) == keys.cluster_slot(cluster_ledger.ops.index_base("42"))
    assert keys.cluster_slot(base) != keys.cluster_slot(cluster_ledger.keyspace.global_())


def test_global_cap_is_shared_by_users_on_every_primary(cluster_ledger):
    users = users_on_distinct_nodes(cluster_ledger)
    bases = [cluster_ledger.keyspace.user(u) for u in users]
    assert len(nodes_of(cluster_ledger.client, bases)) == 3
    limits = Limits(global_tokens_per_day=1000)
    first, second = (cluster_ledger.reserve(u, limits, estimate(400, 0)) for u in users[:2])
    assert first.allowed and second.allowed and first.reservation.uses_global
    refused = cluster_ledger.reserve(users[2], limits, estimate(400, 0), clamp=False)
    assert not refused.allowed and refused.limit == "global_tokens_per_day" and refused.is_budget
    assert refused.retry_after_seconds >= 1
    assert cluster_ledger.global_usage().tokens_today == 800


def test_global_refusal_withdraws_the_users_first_step(cluster_ledger):
    u, v = users_on_distinct_nodes(cluster_ledger, 2)
    limits = Limits(global_tokens_per_month=1000, requests_per_minute=5, tokens_per_month=10**6)
    assert cluster_ledger.reserve(u, limits, estimate(900, 0)).allowed
    refused = cluster_ledger.reserve(v, limits, estimate(500, 0), clamp=False)
    assert refused.limit == "global_tokens_per_month"
    assert refused.requests_remaining == 5  # the refused request is not counted as made
    usage = cluster_ledger.usage(v)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)
    assert (usage.requests_this_minute, usage.tokens_this_minute) == (0, 0)
    assert cluster_ledger.global_usage().tokens_this_month == 900


def test_global_clamp_lowers_the_users_share_to_match(cluster_ledger):
    u, v = users_on_distinct_nodes(cluster_ledger, 2)
    limits = Limits(global_tokens_per_month=1000, tokens_per_month=10_000)
    cluster_ledger.reserve(u, limits, estimate(700, 0))
    d = cluster_ledger.reserve(v, limits, estimate(100, 1000, out=2_000_000))
    assert d.allowed and d.clamped
    assert (d.max_tokens, d.reservation.reserved) == (100, 300)  # 100 + 100 x 2 fits 300
    assert cluster_ledger.usage(v).reserved == 300
    assert cluster_ledger.usage(v).tokens_this_month == 300
    assert cluster_ledger.global_usage().tokens_this_month == 1000


def test_settle_and_release_correct_the_global_counters(cluster_ledger):
    u, v = users_on_distinct_nodes(cluster_ledger, 2)
    limits = Limits(global_tokens_per_month=10_000)
    a = cluster_ledger.reserve(u, limits, estimate(100, 400))
    b = cluster_ledger.reserve(v, limits, estimate(100, 400))
    assert cluster_ledger.global_usage().tokens_this_month == 1000
    assert cluster_ledger.settle(a.reservation, ActualUsage(100, 50)).settled
    assert not cluster_ledger.settle(a.reservation, ActualUsage(100, 50)).settled
    assert cluster_ledger.release(b.reservation) is True
    assert cluster_ledger.release(b.reservation) is False
    figures = cluster_ledger.global_usage()
    assert (figures.tokens_this_month, figures.in_flight) == (150, 0)


def test_abandoned_reservation_expires_with_its_global_share(cluster_ledger, clock):
    u, v = users_on_distinct_nodes(cluster_ledger, 2)
    limits = Limits(global_tokens_per_month=1000, max_concurrent_requests=1)
    abandoned = cluster_ledger.reserve(u, limits, estimate(1000, 0))
    assert abandoned.allowed
    assert not cluster_ledger.reserve(v, limits, estimate(10, 0), clamp=False).allowed
    clock.advance(601)  # RESERVATION_TTL: u never comes back; the global slot reclaims alone
    assert cluster_ledger.global_usage().tokens_this_month == 0
    assert cluster_ledger.reserve(v, limits, estimate(1000, 0)).allowed
    usage = cluster_ledger.usage(u)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)
    # A settle after both leases ended still charges the real usage, globally too.
    late = cluster_ledger.settle(abandoned.reservation, ActualUsage(300, 0))
    assert late.settled and late.late
    assert cluster_ledger.global_usage().tokens_this_month == 1300


def test_settle_that_died_between_its_steps_is_completed_by_a_retry(cluster_ledger):
    u = users_on_distinct_nodes(cluster_ledger, 1)[0]
    d = cluster_ledger.reserve(u, Limits(global_tokens_per_month=10_000), estimate(100, 400))
    plan = cluster_ledger.ops.settle(d.reservation, ActualUsage(100, 50))
    first = next(plan)
    assert isinstance(first, ScriptCall) and first.script == "settle"
    cluster_ledger.perform(first)  # the user's step ran; the process died before the global
    plan.close()
    assert cluster_ledger.global_usage().tokens_this_month == 500
    retry = cluster_ledger.settle(d.reservation, ActualUsage(100, 50))
    assert not retry.settled  # the user's side was already settled...
    assert cluster_ledger.global_usage().tokens_this_month == 150  # ...the global one now is
    cluster_ledger.settle(d.reservation, ActualUsage(100, 50))
    assert cluster_ledger.global_usage().tokens_this_month == 150


def test_active_user_index_is_walked_on_every_primary(cluster_ledger):
    users = list(range(1, 41))
    for uid in users:
        d = cluster_ledger.reserve(uid, Limits(), estimate(1, 1))
        cluster_ledger.settle(d.reservation, ActualUsage(1, 1))
    month = d.reservation.month
    shards = {cluster_ledger.ops.index_base(str(u)) for u in users}
    assert len(nodes_of(cluster_ledger.client, shards)) == 3
    assert sorted(cluster_ledger.active_user_ids(month), key=int) == [str(u) for u in users]
    assert list(cluster_ledger.active_user_ids("199001")) == []


def test_restore_on_the_cluster_lists_the_user_in_its_shard(cluster_client, quota_prefix, clock):
    from llm_quota.ledger.replies import ModelUsage

    calls = []

    def source(uid, month):
        calls.append((uid, month))
        return 900, [ModelUsage("gpt-4o", 3, 600, 300, 900)]

    ledger = Ledger(cluster_client, prefix=quota_prefix, clock=clock, restore=source)
    refused = ledger.reserve(5, Limits(tokens_per_month=1000), estimate(200, 0), clamp=False)
    month, last_month = periods.month_id(clock), periods.month_id(clock, back=1)
    assert calls == [("5", month), ("5", last_month)]  # the month, and the one just closed
    assert not refused.allowed and refused.limit == "tokens_per_month"
    assert ledger.usage(5).tokens_this_month == 900
    assert list(ledger.active_user_ids(month)) == ["5"]


def test_reserve_is_one_script_without_global_caps_and_two_with(
    cluster_ledger, monkeypatch, clock
):
    month = periods.month_id(clock)
    cluster_ledger.restore(1, month)  # a known user: no restore step below
    cluster_ledger._run(cluster_ledger.ops.restore_global(month))  # nor for the global caps
    sent = []
    original = cluster_ledger.perform

    def counting(step):
        sent.append(step.script)
        return original(step)

    monkeypatch.setattr(cluster_ledger, "perform", counting)
    d = cluster_ledger.reserve(1, Limits(tokens_per_month=10**6), estimate(10, 10))
    cluster_ledger.settle(d.reservation, ActualUsage(10, 5))
    assert sent == ["reserve", "settle"]
    sent.clear()
    d = cluster_ledger.reserve(1, Limits(global_tokens_per_day=10**6), estimate(10, 10))
    cluster_ledger.settle(d.reservation, ActualUsage(10, 5))
    assert sent == ["reserve", "global_reserve", "settle", "global_settle"]


# -- many processes --------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_requests_on_the_cluster_admit_exactly_and_never_overspend(
    redis_cluster, cluster_client, quota_prefix
):
    limit, prompt, output = 10_000, 100, 137  # floor(10000 / 237) = 42 of 128
    reserved, charged = run_burst(
        quota_prefix, limit, prompt, output, settle_at_once=False, url=redis_cluster.url
    )
    assert reserved == limit // (prompt + output)
    # The workers count on Redis' clock, so read on it too (not the pinned one).
    usage = Ledger(cluster_client, prefix=quota_prefix).usage(7)
    assert usage.reserved == 0 and usage.in_flight == 0
    assert usage.tokens_this_month == charged <= limit


@pytest.mark.slow
def test_global_cap_across_slots_admits_exactly_under_many_processes(
    redis_cluster, cluster_client, quota_prefix
):
    cluster_ledger = Ledger(cluster_client, prefix=quota_prefix)  # Redis' clock, as the workers
    processes, threads, cap, cost = 6, 12, 5_000, 150  # floor = 33 of 72 users
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=global_burst,
            args=(redis_cluster.url, quota_prefix, 1000 + n * threads, cap, cost, 0, threads,
                  start, results),
        )  # fmt: skip
        for n in range(processes)
    ]
    for p in procs:
        p.start()
    start.set()
    admitted = [uid for _ in procs for uid in results.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(admitted) == cap // cost
    users = [cluster_ledger.keyspace.user(uid) for uid in admitted]
    assert len(nodes_of(cluster_ledger.client, users)) == 3
    figures = cluster_ledger.global_usage()
    assert figures.tokens_this_month == len(admitted) * cost <= cap
    assert figures.in_flight == 0
    # Every refused user's first step was withdrawn: nothing left reserved anywhere.
    for n in range(processes * threads):
        assert cluster_ledger.usage(1000 + n).reserved == 0


# -- settings ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_cluster_url_setting_builds_a_cluster_ledger_sync_and_async(settings, redis_cluster):
    import asyncio

    from llm_quota.checks import check_settings
    from llm_quota.ledger.default import get_async_ledger, get_ledger, set_default_ledger

    set_default_ledger(None)
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "REDIS_CLUSTER_URL": redis_cluster.url}
    assert check_settings() == []  # no django-redis cache needed on a cluster
    ledger = get_ledger()
    assert ledger.cluster
    d = ledger.reserve(3, Limits(global_tokens_per_day=1000), estimate(10, 10))
    assert d.allowed and d.reservation.uses_global

    async def twin_settles():
        twin = await get_async_ledger()
        assert twin.cluster and twin.mirrors is ledger
        settled = await twin.settle(d.reservation, ActualUsage(10, 5))
        await twin.aclose()
        return settled

    assert asyncio.run(twin_settles()).settled
    assert ledger.global_usage().tokens_today == 15


def test_malformed_cluster_url_is_a_system_check_error(settings):
    from llm_quota.checks import check_settings

    for bad in ("redis+cluster://", "http://127.0.0.1:7000", "redis+cluster://host"):
        settings.LLM_QUOTA = {**settings.LLM_QUOTA, "REDIS_CLUSTER_URL": bad}
        assert "llm_quota.E014" in {e.id for e in check_settings()}, bad


@pytest.mark.django_db
def test_snapshot_copies_users_from_every_primary(cluster_ledger):
    from llm_quota.models import UsageSnapshot
    from llm_quota.reporting.snapshot import count_active, snapshot_usage
    from tests.support import factories

    users = [factories.user() for _ in range(12)]
    for user in users:
        d = cluster_ledger.reserve(user.pk, Limits(), estimate(100, 50))
        cluster_ledger.settle(d.reservation, ActualUsage(100, 20))
    bases = [cluster_ledger.keyspace.user(user.pk) for user in users]
    assert len(nodes_of(cluster_ledger.client, bases)) == 3
    assert count_active(cluster_ledger) == 12
    run = snapshot_usage(ledger=cluster_ledger)
    assert (run.users, run.rows_written, run.lost) == (12, 12, 0)
    rows = UsageSnapshot.objects.filter(user__in=users)
    assert sorted(row.base_tokens for row in rows) == [120] * 12
    assert snapshot_usage(ledger=cluster_ledger).rows_written == 0  # idempotent


@pytest.mark.parametrize("late", ["before", "after"], ids=["released-first", "ran-first"])
def test_a_global_step_whose_reply_was_lost_holds_nothing_once_released(cluster_ledger, late):
    """The user's step answered, the global step's reply was lost (the {g} primary froze):
    the plan withdraws the user's share, and the journal's release of the id reaches the
    global slot before or after the frozen step runs there. Either way nothing is held."""
    u = users_on_distinct_nodes(cluster_ledger, 1)[0]
    limits = Limits(global_tokens_per_month=1000, max_concurrent_requests=1)
    # The global counters known (restored once): the frozen step then takes its share.
    cluster_ledger._run(cluster_ledger.ops.restore_global(cluster_ledger.periods()[1]))
    rid = keys.reservation_id()
    plan = cluster_ledger.ops.reserve(u, limits, estimate(100, 400), reservation_id=rid)
    global_step = next(plan)
    while getattr(global_step, "script", None) != "global_reserve":  # restore, then reserve
        global_step = plan.send(cluster_ledger.perform(global_step))
    withdraw = plan.throw(RedisTimeoutError("the reply was lost"))
    with pytest.raises(RedisTimeoutError):
        plan.send(cluster_ledger.perform(withdraw))
    lost = lost_reservation(rid, u, limits, estimate(100, 400))
    if late == "after":
        cluster_ledger.perform(global_step)  # Redis runs the frozen step, then the release
        cluster_ledger.release(lost)
    else:
        cluster_ledger.release(lost)
        assert int(cluster_ledger.perform(global_step)[0]) == 3  # refused: released already
    figures = cluster_ledger.global_usage()
    assert (figures.tokens_this_month, figures.in_flight) == (0, 0)
    usage = cluster_ledger.usage(u)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)
    assert cluster_ledger.reserve(u, limits, estimate(100, 900)).allowed
