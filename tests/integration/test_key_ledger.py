"""An API key as a second payer in the ledger: its limits are reserved in the same
script step as its user's, settled, released and expired with them (real Redis)."""

from __future__ import annotations

from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support.factories import estimate


def _with_key(key: str = "7", **limits) -> Limits:
    return Limits(tokens_per_month=100_000, api_key=key, **limits)


def test_a_key_budget_refuses_and_names_the_key_limit(ledger):
    limits = _with_key(key_tokens_per_month=1000)
    admitted = [ledger.reserve(1, limits, estimate(100, 150), clamp=False) for _ in range(5)]
    assert [d.allowed for d in admitted] == [True, True, True, True, False]
    assert admitted[-1].limit == "key.tokens_per_month" and admitted[-1].is_budget
    # The user's own budget was left untouched by the refusal, and another key (or none)
    # of the same user still passes.
    assert ledger.usage(1).tokens_this_month == 1000
    assert ledger.reserve(1, _with_key("8", key_tokens_per_month=1000), estimate(1, 1)).allowed
    assert ledger.reserve(1, Limits(tokens_per_month=100_000), estimate(1, 1)).allowed


def test_a_user_limit_refusal_reserves_nothing_for_the_key(ledger):
    limits = _with_key(key_tokens_per_day=10_000, tokens_per_day=300)
    assert ledger.reserve(1, limits, estimate(100, 100), clamp=False).allowed
    refused = ledger.reserve(1, limits, estimate(100, 100), clamp=False)
    assert not refused.allowed and refused.limit == "tokens_per_day"
    key = ledger.key_usage(1, "7")
    assert (key.tokens_today, key.reserved, key.requests_this_minute) == (200, 200, 1)


def test_key_requests_per_minute_is_its_own_window(ledger):
    limits = _with_key(key_requests_per_minute=2, requests_per_minute=10)
    decisions = [ledger.reserve(1, limits, estimate(1, 1)) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[-1].limit == "key.requests_per_minute"
    assert 0 < decisions[-1].retry_after <= 60
    # The rate-limit headers show the tighter of the two request limits.
    assert (decisions[1].requests_limit, decisions[1].requests_remaining) == (2, 0)


def test_settle_moves_the_key_to_actual_usage_and_release_gives_it_back(ledger):
    limits = _with_key(key_tokens_per_month=10_000)
    held = ledger.reserve(1, limits, estimate(100, 400)).reservation
    assert held.api_key == "7"
    ledger.settle(held, ActualUsage(100, 50))
    key = ledger.key_usage(1, "7")
    assert (key.tokens_this_month, key.reserved, key.requests, key.base_tokens) == (150, 0, 1, 150)
    second = ledger.reserve(1, limits, estimate(100, 400)).reservation
    assert ledger.release(second) is True
    key = ledger.key_usage(1, "7")
    assert (key.tokens_this_month, key.reserved) == (150, 0)
    assert ledger.usage(1).tokens_this_month == 150


def test_an_abandoned_reservation_frees_the_key_share_too(ledger, clock):
    limits = _with_key(key_tokens_per_month=1000)
    assert ledger.reserve(1, limits, estimate(400, 400), clamp=False).allowed
    assert not ledger.reserve(1, limits, estimate(400, 400), clamp=False).allowed
    clock.advance(ledger.ops.ttl_ms / 1000 + 1)
    assert ledger.reserve(1, limits, estimate(400, 400), clamp=False).allowed


def test_a_key_clamps_the_output_to_its_budget(ledger):
    decision = ledger.reserve(1, _with_key(key_tokens_per_day=300), estimate(100, 1000))
    assert decision.allowed and decision.reservation.max_tokens == 200
    assert decision.tokens_limit == 300 and decision.tokens_remaining == 0


def test_a_keys_housekeeping_runs_when_its_dates_say_so(ledger, clock):
    """A key's expired leases and finished records are looked for only when the dates
    in its state hash are due (one HMGET per reserve, not two scans), and then go."""
    limits = _with_key(key_tokens_per_month=10**6)
    for _ in range(3):
        held = ledger.reserve(1, limits, estimate(10, 10)).reservation
        ledger.settle(held, ActualUsage(10, 10))
    base = ledger.keyspace.api_key("1", "7")
    due = ledger.client.hmget(base + ":s", "pdue", "zdue")
    assert all(int(d) > 0 for d in due)
    assert ledger.client.hlen(base + ":rr") == 3
    clock.advance(ledger.ops.ttl_ms / 1000 + 6)  # past the records' TTL and FORGET_EVERY
    assert ledger.reserve(1, limits, estimate(10, 10)).allowed
    assert ledger.client.hlen(base + ":rr") == 1  # only the new share's record
    assert ledger.client.pttl(base + ":s") > 0
