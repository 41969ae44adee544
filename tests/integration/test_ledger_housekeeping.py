"""Reserve's housekeeping is cheap because it is lazy: it trims the window from its
front, and scans leases and tombstones only when the dates kept in ``B:s`` say one
is due. These tests pin the moments where lazy could turn into wrong."""

from __future__ import annotations

from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support.factories import estimate

TTL = 600  # the ``ledger`` fixture's reservation TTL


def state(ledger, redis_client, uid=1) -> dict[str, str]:
    raw = redis_client.hgetall(f"{ledger.keyspace.user(str(uid))}:s")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_a_lease_behind_a_settled_one_is_reclaimed_exactly_when_it_expires(ledger, clock):
    limits = Limits(max_concurrent_requests=1, tokens_per_month=100_000)
    first = ledger.reserve(1, limits, estimate(100, 100), clamp=False)
    ledger.settle(first.reservation, ActualUsage(100, 50))  # the due date still points at it
    clock.advance(10)
    ledger.reserve(1, limits, estimate(300, 300), clamp=False)  # abandoned
    clock.advance(TTL - 10 + 0.5)  # the first lease's date: a scan finds nothing due
    assert ledger.reserve(1, limits, estimate(10, 10)).limit == "max_concurrent_requests"
    clock.advance(9.4)  # 0.1 s before the abandoned lease ends
    assert ledger.reserve(1, limits, estimate(10, 10)).limit == "max_concurrent_requests"
    clock.advance(0.2)
    admitted = ledger.reserve(1, limits, estimate(10, 10), clamp=False)
    assert admitted.allowed
    usage = ledger.usage(1)
    # The abandoned estimate (600) went back; the first settle (150) and the new
    # estimate (20) remain.
    assert (usage.tokens_this_month, usage.reserved, usage.in_flight) == (170, 20, 1)


def test_reserve_reclaims_on_a_hash_written_without_the_due_dates(ledger, clock, redis_client):
    limits = Limits(max_concurrent_requests=1)
    ledger.reserve(1, limits, estimate(100, 100))
    redis_client.hdel(f"{ledger.keyspace.user('1')}:s", "pdue", "zdue")  # an older version
    clock.advance(TTL + 1)
    assert ledger.reserve(1, limits, estimate(100, 100)).allowed


def test_tombstones_go_after_their_ttl_with_only_reserves_running(ledger, clock, redis_client):
    limits = Limits(tokens_per_month=100_000)
    old = ledger.reserve(1, limits, estimate(100, 100)).reservation
    ledger.settle(old, ActualUsage(100, 10))
    records = f"{ledger.keyspace.user('1')}:rr"
    assert redis_client.hexists(records, old.id)
    clock.advance(TTL + 6)  # past the TTL and the few seconds forgetting may lag
    ledger.reserve(1, limits, estimate(100, 100))
    assert not redis_client.hexists(records, old.id)
    assert redis_client.zscore(f"{ledger.keyspace.user('1')}:z", old.id) is None


def test_many_expired_window_entries_all_leave_the_window(ledger, clock):
    # More than the front read (8) and more than one batch (200) expire at once.
    limits = Limits(requests_per_minute=1000, tokens_per_minute=10**9)
    for _ in range(250):
        ledger.settle(ledger.reserve(1, limits, estimate(10, 0)).reservation, ActualUsage(10, 0))
        clock.advance(0.01)
    clock.advance(60)
    decision = ledger.reserve(1, limits, estimate(7, 0))
    assert decision.allowed
    assert (decision.requests_remaining, decision.tokens_remaining) == (999, 10**9 - 7)
    usage = ledger.usage(1)
    assert (usage.requests_this_minute, usage.tokens_this_minute) == (1, 7)


def test_a_refusal_still_records_what_left_the_window(ledger, clock):
    limits = Limits(tokens_per_minute=1000)
    ledger.settle(ledger.reserve(1, limits, estimate(600, 0)).reservation, ActualUsage(600, 0))
    clock.advance(61)
    assert not ledger.reserve(1, limits, estimate(2000, 0), clamp=False).allowed
    assert ledger.usage(1).tokens_this_minute == 0
    assert ledger.reserve(1, limits, estimate(1000, 0), clamp=False).allowed
