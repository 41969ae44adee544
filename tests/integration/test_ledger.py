"""The Redis ledger against a real Redis: windows, periods, expiry, idempotency."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from llm_quota.ledger import keys
from llm_quota.ledger.keys import InvalidKeyPart
from llm_quota.ledger.ops import ReservationIdSpent
from llm_quota.ledger.resilience import lost_reservation
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support import periods
from tests.support.factories import estimate


def test_settle_replaces_the_estimate_with_actual_usage(ledger):
    d = ledger.reserve(1, Limits(tokens_per_month=10_000), estimate(100, 400))
    assert d.allowed and d.reservation.reserved == 500
    assert ledger.usage(1).reserved == 500
    ledger.settle(d.reservation, ActualUsage(100, 50))
    usage = ledger.usage(1)
    assert (usage.tokens_this_month, usage.tokens_today, usage.reserved) == (150, 150, 0)
    assert usage.by_model[0].model == "gpt-4o"
    assert (usage.by_model[0].requests, usage.by_model[0].output_tokens) == (1, 50)


def test_settle_twice_changes_nothing(ledger):
    d = ledger.reserve(1, Limits(tokens_per_month=10_000), estimate(100, 400))
    first = ledger.settle(d.reservation, ActualUsage(100, 50))
    second = ledger.settle(d.reservation, ActualUsage(100, 50))
    third = ledger.settle(d.reservation, ActualUsage(999, 999))
    assert first.settled and not second.settled and not third.settled
    usage = ledger.usage(1)
    assert usage.tokens_this_month == 150
    assert usage.by_model[0].requests == 1


def test_release_gives_everything_back_and_is_idempotent(ledger):
    d = ledger.reserve(
        1, Limits(tokens_per_month=1000, max_concurrent_requests=1), estimate(100, 400)
    )
    assert ledger.release(d.reservation) is True
    assert ledger.release(d.reservation) is False
    assert not ledger.settle(d.reservation, ActualUsage(100, 400)).settled
    usage = ledger.usage(1)
    assert (usage.tokens_this_month, usage.reserved, usage.in_flight) == (0, 0, 0)
    # The concurrency slot is free again.
    assert ledger.reserve(1, Limits(max_concurrent_requests=1), estimate(1, 1)).allowed


def test_monthly_budget_admits_until_full_and_names_the_limit(ledger, clock):
    limits = Limits(tokens_per_month=1000)
    admitted = [ledger.reserve(1, limits, estimate(100, 150), clamp=False) for _ in range(5)]
    assert [d.allowed for d in admitted] == [True, True, True, True, False]
    refused = admitted[-1]
    assert refused.limit == "tokens_per_month" and refused.is_budget
    month_end = datetime(2099, 12, 1, tzinfo=UTC).timestamp()
    assert refused.retry_after_seconds == int(month_end - clock())


def test_abandoned_reservation_expires_and_frees_tokens_and_slot(ledger, clock):
    limits = Limits(tokens_per_month=2000, max_concurrent_requests=1)
    held = ledger.reserve(1, limits, estimate(500, 500), clamp=False)
    assert held.allowed
    blocked = ledger.reserve(1, limits, estimate(10, 10), clamp=False)
    assert not blocked.allowed and blocked.limit == "max_concurrent_requests"
    clock.advance(601)  # RESERVATION_TTL
    usage = ledger.usage(1)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)
    assert ledger.reserve(1, limits, estimate(500, 500), clamp=False).allowed


def test_late_settle_after_expiry_still_charges_real_usage(ledger, clock):
    d = ledger.reserve(1, Limits(tokens_per_month=10_000), estimate(100, 100))
    clock.advance(700)
    ledger.usage(1)  # housekeeping gives the estimate back
    outcome = ledger.settle(d.reservation, ActualUsage(100, 30))
    assert outcome.settled and outcome.late
    assert ledger.usage(1).tokens_this_month == 130
    assert not ledger.settle(d.reservation, ActualUsage(100, 30)).settled


def test_sliding_window_admits_exactly_the_rate(ledger, clock):
    limits = Limits(requests_per_minute=5)
    results = []
    for _ in range(12):  # one request every 10 s for two minutes
        results.append(ledger.reserve(1, limits, estimate(1, 1)).allowed)
        clock.advance(10)
    # Any 60 s window holds at most 5 admissions: 5 in, 1 out, then one per slot freed.
    assert results == [True] * 5 + [False] + [True] * 5 + [False]


def test_sliding_window_has_no_edge_burst(ledger, clock):
    """A fixed window would let 2x through around its edge; a sliding one never does."""
    limits = Limits(requests_per_minute=10)
    clock.set(datetime(2099, 11, 27, 12, 0, 59, tzinfo=UTC))
    first = sum(ledger.reserve(1, limits, estimate(1, 1)).allowed for _ in range(10))
    clock.advance(2)  # across the minute boundary
    second = sum(ledger.reserve(1, limits, estimate(1, 1)).allowed for _ in range(10))
    assert (first, second) == (10, 0)
    refused = ledger.reserve(1, limits, estimate(1, 1))
    assert refused.limit == "requests_per_minute" and refused.retry_after_seconds == 58


def test_lowered_rpm_retry_after_is_when_the_count_falls_under_the_new_limit(ledger, clock):
    """10 requests at rpm 10, one every 5 s, then the tier's rpm is lowered to 3: the
    window must lose 8 entries before a request fits, so the wait runs until the 8th
    oldest leaves (not the oldest, which a retry then would find refused again)."""
    for _ in range(10):
        assert ledger.reserve(1, Limits(requests_per_minute=10), estimate(1, 1)).allowed
        clock.advance(5)
    # Entries at t=0,5,...,45; now t=50. The 8th oldest (t=35) leaves at t=95.
    lowered = Limits(requests_per_minute=3)
    refused = ledger.reserve(1, lowered, estimate(1, 1))
    assert refused.limit == "requests_per_minute"
    assert refused.retry_after == 45
    clock.advance(refused.retry_after - 0.001)
    assert not ledger.reserve(1, lowered, estimate(1, 1)).allowed
    clock.advance(0.002)
    assert ledger.reserve(1, lowered, estimate(1, 1)).allowed


def test_token_figures_describe_the_limit_with_least_left(ledger, clock):
    limits = Limits(tokens_per_minute=1000, tokens_per_month=1500)
    first = ledger.reserve(1, limits, estimate(800, 0))
    # 200 left in the minute, 700 in the month: the minute is described.
    assert (first.tokens_limit, first.tokens_remaining, first.tokens_window) == (1000, 200, 60)
    clock.advance(61)
    second = ledger.reserve(1, limits, estimate(100, 0))
    # The minute is empty again (900 left); the month has 600 left.
    month_end = datetime(2099, 12, 1, tzinfo=UTC).timestamp()
    assert (second.tokens_limit, second.tokens_remaining) == (1500, 600)
    assert second.tokens_reset == pytest.approx(month_end - clock())
    assert second.tokens_window == 30 * 86400
    only_day = ledger.reserve(2, Limits(tokens_per_day=50), estimate(100, 0), clamp=False)
    assert not only_day.allowed
    assert (only_day.tokens_limit, only_day.tokens_remaining) == (50, 50)


def test_tokens_per_minute_retry_after_is_when_enough_leaves_the_window(ledger, clock):
    limits = Limits(tokens_per_minute=1000)
    ledger.reserve(1, limits, estimate(300, 0))
    clock.advance(20)
    ledger.reserve(1, limits, estimate(600, 0))
    clock.advance(5)
    refused = ledger.reserve(1, limits, estimate(400, 0), clamp=False)
    # 100 left; 300 more needed leave when the first entry does, 35 s from now.
    assert refused.limit == "tokens_per_minute" and not refused.is_budget
    assert refused.retry_after_seconds == 35


def test_day_boundary_rolls_over_in_the_period_timezone(redis_client, quota_prefix, clock):
    tz = ZoneInfo("America/New_York")
    ledger = Ledger(redis_client, prefix=quota_prefix, timezone="America/New_York", clock=clock)
    limits = Limits(tokens_per_day=100)
    clock.set(datetime(2099, 11, 27, 23, 59, 50, tzinfo=tz))
    assert ledger.reserve(1, limits, estimate(100, 0)).allowed
    refused = ledger.reserve(1, limits, estimate(1, 0))
    assert refused.limit == "tokens_per_day" and refused.retry_after_seconds == 10
    clock.advance(10)  # midnight in New York (05:00 UTC)
    fresh = ledger.reserve(1, limits, estimate(100, 0))
    assert fresh.allowed and fresh.reservation.day == "20991128"


def test_month_boundary_rolls_over_and_keeps_last_month(ledger, clock):
    limits = Limits(tokens_per_month=100)
    clock.set(datetime(2099, 11, 30, 23, 59, 59, tzinfo=UTC))
    d = ledger.reserve(1, limits, estimate(100, 0))
    assert d.allowed and d.reservation.month == "209911"
    assert not ledger.reserve(1, limits, estimate(1, 0)).allowed
    clock.advance(1)
    d2 = ledger.reserve(1, limits, estimate(100, 0))
    assert d2.allowed and d2.reservation.month == "209912"
    # A settle after the boundary lands in the month the reservation was made in.
    ledger.settle(d.reservation, ActualUsage(60, 0))
    assert ledger.usage(1).tokens_this_month == 100
    assert int(redis_client_get(ledger, "209911")) == 60


def redis_client_get(ledger: Ledger, month: str) -> bytes:
    return ledger.client.get(ledger.keyspace.month_counter(1, month))


def test_clamping_lowers_max_tokens_to_what_fits(ledger):
    limits = Limits(tokens_per_month=1000)
    ledger.reserve(1, limits, estimate(700, 0))
    d = ledger.reserve(1, limits, estimate(100, 1000, out=2_000_000))
    assert d.allowed and d.clamped
    assert d.max_tokens == 100 and d.reservation.reserved == 300  # 100 + 100 x 2
    no_room = ledger.reserve(1, limits, estimate(10, 100))
    assert not no_room.allowed and no_room.limit == "tokens_per_month"


def test_clamping_refuses_when_even_the_minimum_output_does_not_fit(ledger):
    limits = Limits(tokens_per_month=1000)
    d = ledger.reserve(1, limits, estimate(990, 500), min_output_tokens=16)
    assert not d.allowed


def test_global_cap_is_shared_by_all_users(ledger):
    limits = Limits(global_tokens_per_day=1000)
    assert ledger.reserve(1, limits, estimate(600, 0)).allowed
    refused = ledger.reserve(2, limits, estimate(600, 0), clamp=False)
    assert not refused.allowed and refused.limit == "global_tokens_per_day"
    assert refused.is_budget


def test_abandoned_global_share_expires_even_if_its_user_never_returns(ledger, clock):
    limits = Limits(global_tokens_per_day=1000)
    assert ledger.reserve(1, limits, estimate(1000, 0)).allowed  # user 1 crashes, never back
    assert not ledger.reserve(2, limits, estimate(10, 0), clamp=False).allowed
    clock.advance(601)  # RESERVATION_TTL
    assert ledger.global_usage().tokens_today == 0
    assert ledger.reserve(2, limits, estimate(1000, 0)).allowed


def test_settle_and_release_correct_the_global_counters(ledger):
    limits = Limits(global_tokens_per_month=10_000)
    a = ledger.reserve(1, limits, estimate(100, 400))
    b = ledger.reserve(2, limits, estimate(100, 400))
    assert ledger.global_usage().tokens_this_month == 1000
    ledger.settle(a.reservation, ActualUsage(100, 50))
    ledger.settle(a.reservation, ActualUsage(100, 50))
    ledger.release(b.reservation)
    figures = ledger.global_usage()
    assert (figures.tokens_this_month, figures.in_flight) == (150, 0)


def test_active_users_are_listed_for_the_snapshot_without_keys(ledger, clock):
    for uid in (3, 1, 2):
        d = ledger.reserve(uid, Limits(), estimate(1, 1))
        ledger.settle(d.reservation, ActualUsage(1, 1))
        clock.advance(10)
    month = periods.month_id(clock)
    assert sorted(ledger.active_user_ids(month)) == ["1", "2", "3"]
    assert ledger.count_active_users(month) == 3
    since = int((clock() - 15) * 1000)  # after user 1 settled, before user 2 did
    assert list(ledger.active_user_ids(month, since_ms=since)) == ["2"]
    assert list(ledger.active_user_ids(periods.month_id(clock, back=1))) == []


def test_binding_limit_is_the_one_that_clears_last(ledger):
    limits = Limits(requests_per_minute=1, tokens_per_day=100)
    ledger.reserve(1, limits, estimate(100, 0))
    refused = ledger.reserve(1, limits, estimate(50, 0), clamp=False)
    # Both refuse; the day budget clears later than the request window.
    assert refused.limit == "tokens_per_day"


def test_unsafe_ids_never_become_keys(ledger):
    for bad in ("1}:x", "a b", "*", "", "x" * 65, -1):
        with pytest.raises(InvalidKeyPart):
            ledger.reserve(bad, Limits(), estimate(1, 1))


def test_one_round_trip_to_reserve_and_one_to_settle(private_redis, clock, monkeypatch):
    """INFO commandstats: a gated request is one EVALSHA in, one EVALSHA out.

    On a private server, so that no other test run's commands blur the count."""
    client = private_redis.client()
    ledger = Ledger(client, prefix="rt", clock=clock)
    limits = Limits(
        requests_per_minute=100,
        tokens_per_minute=10**6,
        tokens_per_day=10**7,
        tokens_per_month=10**8,
        max_concurrent_requests=10,
    )
    warm = ledger.reserve(1, limits, estimate(10, 10))  # loads the scripts
    ledger.settle(warm.reservation, ActualUsage(10, 5))
    sent = []
    conn = client.connection_pool.get_connection()
    client.connection_pool.release(conn)
    original = type(conn).send_packed_command

    def counting(self, command, check_health=True):
        sent.append(command)
        return original(self, command, check_health)

    before = client.info("commandstats")
    monkeypatch.setattr(type(conn), "send_packed_command", counting)
    d = ledger.reserve(1, limits, estimate(10, 10))
    ledger.settle(d.reservation, ActualUsage(10, 5))
    round_trips = len(sent)
    monkeypatch.undo()
    after = client.info("commandstats")

    def calls(stats, name):
        return stats.get(f"cmdstat_{name}", {}).get("calls", 0)

    assert round_trips == 2
    assert calls(after, "evalsha") - calls(before, "evalsha") == 2
    assert calls(after, "eval") - calls(before, "eval") == 0


# -- the caller's id: a lost reply is released in either order ------------------------

ONE_AT_A_TIME = Limits(
    max_concurrent_requests=1, tokens_per_month=10_000, global_tokens_per_month=10**6
)


def test_a_reserve_that_arrives_after_its_release_reserves_nothing(ledger):
    rid = keys.reservation_id()
    lost = lost_reservation(rid, 1, ONE_AT_A_TIME, estimate(100, 400))
    # The journal's release reaches Redis first (the reserve is still in a frozen
    # server's socket): it leaves a tombstone.
    assert ledger.release(lost) is False
    with pytest.raises(ReservationIdSpent):
        ledger.reserve(1, ONE_AT_A_TIME, estimate(100, 400), reservation_id=rid)
    usage = ledger.usage(1)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)
    assert ledger.reserve(1, ONE_AT_A_TIME, estimate(1, 1)).allowed  # the slot is free


def test_a_reserve_released_after_it_ran_gives_everything_back(ledger):
    rid = keys.reservation_id()
    ran = ledger.reserve(1, ONE_AT_A_TIME, estimate(100, 400), reservation_id=rid)
    assert ran.allowed and ran.reservation.id == rid
    assert ledger.release(lost_reservation(rid, 1, ONE_AT_A_TIME, estimate(100, 400))) is True
    usage = ledger.usage(1)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 0)


def test_a_reserve_sent_twice_reserves_once_and_answers_the_same(ledger):
    """A client that retries a reserve whose reply it lost (redis-py's Retry, a
    cluster's redirect) sends the same id again: it must not count twice."""
    limits = Limits(tokens_per_month=1000, tokens_per_minute=900, requests_per_minute=10)
    rid = keys.reservation_id()
    first = ledger.reserve(1, limits, estimate(100, 700), reservation_id=rid)
    again = ledger.reserve(1, limits, estimate(100, 700), reservation_id=rid)
    assert first.reservation.reserved == 800 and first.reservation.max_tokens == 700
    assert again.allowed and again.reservation == first.reservation
    assert (again.requests_remaining, again.tokens_remaining) == (9, 100)
    usage = ledger.usage(1)
    assert (usage.reserved, usage.in_flight, usage.requests_this_minute) == (800, 1, 1)
    ledger.settle(again.reservation, ActualUsage(100, 50))
    assert ledger.usage(1).tokens_this_month == 150


def test_a_clamped_reserve_sent_twice_is_answered_with_its_clamp(ledger):
    limits = Limits(tokens_per_month=500)
    rid = keys.reservation_id()
    first = ledger.reserve(1, limits, estimate(100, 700), reservation_id=rid)
    again = ledger.reserve(1, limits, estimate(100, 700), reservation_id=rid)
    assert first.reservation.max_tokens == again.reservation.max_tokens == 400
    assert ledger.usage(1).reserved == 500


# -- renew.lua -----------------------------------------------------------------------


def test_a_renewed_lease_outlives_the_ttl_it_was_reserved_with(ledger, clock):
    held = ledger.reserve(1, ONE_AT_A_TIME, estimate(100, 400)).reservation
    clock.advance(500)
    assert ledger.renew(held) is True
    clock.advance(200)  # 700 s after the reserve, 200 s after the renewal
    refused = ledger.reserve(1, ONE_AT_A_TIME, estimate(1, 1))
    assert refused.limit == "max_concurrent_requests"
    assert ledger.usage(1).reserved == 500
    clock.advance(401)  # a TTL after the renewal: no more renewals, it expires
    assert ledger.reserve(1, ONE_AT_A_TIME, estimate(1, 1)).allowed
    assert ledger.renew(held) is False, "an expired lease stays expired"


def test_renewing_a_finished_reservation_changes_nothing(ledger, clock):
    settled = ledger.reserve(1, Limits(), estimate(100, 400)).reservation
    released = ledger.reserve(1, Limits(), estimate(100, 400)).reservation
    ledger.settle(settled, ActualUsage(100, 10))
    ledger.release(released)
    assert ledger.renew(settled) is False and ledger.renew(released) is False
    usage = ledger.usage(1)
    assert (usage.reserved, usage.in_flight, usage.tokens_this_month) == (0, 0, 110)


def test_renewal_moves_reserves_housekeeping_date_with_the_lease(ledger, clock, redis_client):
    held = ledger.reserve(1, Limits(), estimate(100, 400)).reservation
    base = ledger.keyspace.user("1")
    before = int(redis_client.hget(f"{base}:s", "pdue"))
    clock.advance(300)
    ledger.renew(held)
    assert int(redis_client.hget(f"{base}:s", "pdue")) == before + 300_000


def test_a_renewed_global_share_keeps_its_tokens_counted(ledger, clock):
    limits = Limits(global_tokens_per_month=1000)
    held = ledger.reserve(1, limits, estimate(100, 400)).reservation
    clock.advance(500)
    assert ledger.renew(held)
    clock.advance(200)
    assert ledger.global_usage().tokens_this_month == 500
    refused = ledger.reserve(2, limits, estimate(100, 500), clamp=False)
    assert refused.limit == "global_tokens_per_month"
