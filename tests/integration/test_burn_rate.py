"""The burn-rate breaker (contract §11) in the ledger, against a real Redis, on a
pinned clock: the baseline settle keeps, the trip inside reserve, the pause, resume."""

from __future__ import annotations

import statistics

from llm_quota.rules.accounting import ActualUsage, Limits
from tests.support.factories import estimate

BREAKER = Limits(burn_multiplier=10, burn_floor=1_000, burn_pause=600)


def spend(ledger, limits, prompt, output=0, uid=1):
    """One call: reserve ``prompt + output`` base tokens and settle them as used."""
    d = ledger.reserve(uid, limits, estimate(prompt, output), clamp=False)
    if d.allowed:
        ledger.settle(d.reservation, ActualUsage(prompt, output))
    return d


def test_a_new_caller_is_paused_once_a_minute_spend_passes_the_floor(ledger, clock):
    decisions = [spend(ledger, BREAKER, 300) for _ in range(6)]
    # The fifth call finds 1,200 in the minute before it: over the floor.
    assert [d.allowed for d in decisions] == [True, True, True, True, False, False]
    tripped = decisions[4]
    assert tripped.limit == "burn_rate_exceeded" and tripped.burn_tripped and tripped.is_budget
    assert tripped.retry_after == 600
    assert not decisions[5].burn_tripped  # paused already: the trip is reported once
    clock.advance(599)
    assert ledger.reserve(1, BREAKER, estimate(1, 0)).retry_after == 1
    clock.advance(1)
    assert ledger.reserve(1, BREAKER, estimate(1, 0)).allowed


def test_the_breaker_is_off_when_any_of_its_settings_is_none(ledger):
    for off in (Limits(burn_multiplier=10, burn_floor=1_000), Limits()):
        assert all(spend(ledger, off, 300, uid=2).allowed for _ in range(10))


def busy_buckets(ledger, clock, buckets=2):
    """Busy 5-minute buckets: 4,000 base tokens in one minute of each. Settle keeps
    the baseline whether the tier's breaker is on or not; a closed bucket may at most
    double it (from 1,000 for a new caller), so two such buckets make it 4,000."""
    for _ in range(buckets):
        for _ in range(10):
            assert spend(ledger, Limits(), 400).allowed
        clock.advance(300)


def test_a_caller_with_a_busy_baseline_is_not_paused_at_its_usual_pace(ledger, clock):
    busy_buckets(ledger, clock)
    baseline = ledger.burn_state(1).baseline_per_minute
    assert 3_950 < baseline <= 4_000  # a few buckets' decay at most
    for _ in range(30):  # half an hour at its busiest pace: never paused
        assert spend(ledger, BREAKER, 4_000).allowed
        clock.advance(60)
    clock.advance(3600)
    baseline = ledger.burn_state(1).baseline_per_minute  # that half hour renewed it
    # Ten times the baseline in the minute before a call is allowed; more is not.
    allowed = 0
    while (d := spend(ledger, BREAKER, 4_000)).allowed:
        allowed += 1
    assert d.limit == "burn_rate_exceeded"
    assert 4_000 * (allowed - 1) <= 10 * baseline < 4_000 * allowed
    assert ledger.burn_state(1).paused


def test_the_baseline_decays_over_days(ledger, clock):
    busy_buckets(ledger, clock)
    spend(ledger, Limits(), 1)  # closes the last busy bucket
    clock.advance(7 * 86400)  # a week of silence: two half-lives
    assert 950 < ledger.burn_state(1).baseline_per_minute <= 4_000 // 4


def test_a_runaway_whose_bucket_closes_before_it_trips_at_most_doubles_the_baseline(ledger, clock):
    busy_buckets(ledger, clock)
    clock.advance(300 - 30)  # 30 s before a bucket ends
    for _ in range(30):  # 36,000 in the minute: under the 40,000 that trips
        assert spend(ledger, BREAKER, 1_200).allowed
        clock.advance(1)
    assert 7_900 < ledger.burn_state(1).baseline_per_minute <= 8_000  # not 36,000
    # The new bar is about 80,000: the loop, three times as fast now, trips it.
    for _ in range(60):
        clock.advance(1)
        if not all(spend(ledger, BREAKER, 1_200).allowed for _ in range(3)):
            break
    assert ledger.burn_state(1).paused


def test_the_spend_that_tripped_never_becomes_the_baseline(ledger, clock):
    while spend(ledger, BREAKER, 300).allowed:
        pass
    clock.advance(3600)  # the pause ends, the bucket closed long ago
    assert ledger.burn_state(1).baseline_per_minute == 0


def test_staff_resume_ends_the_pause_and_waits_a_minute_before_tripping_again(ledger, clock):
    while spend(ledger, BREAKER, 300).allowed:
        pass
    assert ledger.burn_resume(1) is True
    assert ledger.burn_resume(1) is False
    assert not ledger.burn_state(1).paused
    # The window still holds the spend that tripped it: no trip for one window.
    assert spend(ledger, BREAKER, 300).allowed
    clock.advance(61)
    assert all(spend(ledger, BREAKER, 300).allowed for _ in range(4))
    assert spend(ledger, BREAKER, 300).limit == "burn_rate_exceeded"


def test_another_refusal_is_not_a_trip(ledger):
    limits = Limits(tokens_per_day=500, burn_multiplier=10, burn_floor=450, burn_pause=600)
    assert spend(ledger, limits, 400).allowed
    refused = spend(ledger, limits, 400)  # 800 in the minute, but the day refuses first
    assert refused.limit == "tokens_per_day" and not refused.burn_tripped


# -- adaptive slow-down past the soft limit ----------------------------------------------

SLOW = Limits(requests_per_minute=60, tokens_per_minute=60_000, tokens_per_month=100_000,
              slow_soft_percent=50)  # fmt: skip


def test_a_slow_tier_shrinks_its_rates_as_the_budget_past_the_soft_limit_runs_out(ledger, clock):
    def limits_now():
        d = ledger.reserve(1, SLOW, estimate(1, 0))
        ledger.release(d.reservation)
        clock.advance(61)  # an empty window for the next look
        return d.requests_limit, d.tokens_limit

    assert limits_now() == (60, 60_000)  # below the soft limit: whole
    for used in (50_000, 40_000, 9_000):  # 50%, 90%, 99% of the month
        spend(ledger, Limits(), used)
        clock.advance(61)
        if used == 50_000:
            assert limits_now()[0] == 60  # at the soft limit: still whole
        elif used == 40_000:
            assert limits_now()[0] == 12  # a fifth of the rest is left
        else:
            assert limits_now()[0] == 1  # the last per cent: one a minute


def test_a_loop_past_the_soft_limit_waits_longer_and_longer(ledger, clock):
    spend(ledger, Limits(), 50_000)  # at the soft limit
    admitted, waits = [], []
    for second in range(1800):  # a loop: a call a second, 1,000 base tokens each
        clock.advance(1)
        d = spend(ledger, SLOW, 1_000)
        if d.allowed:
            admitted.append(second)
        elif d.limit == "tokens_per_month":
            break
        else:
            assert d.limit in ("requests_per_minute", "tokens_per_minute")
            assert not d.is_budget  # a rate limit: retrying later works
            waits.append((second, d.retry_after))
    # The rest of the budget (50,000) is still spent, all of it, but over six minutes
    # instead of 50 s: the calls thin out as it runs out.
    assert len(admitted) == 50 and admitted[-1] >= 300
    gaps = [b - a for a, b in zip(admitted, admitted[1:], strict=False)]
    assert statistics.median(gaps[-10:]) >= 4 * statistics.median(gaps[:10])
    assert max(wait for _, wait in waits) <= 60  # each refusal: wait for the window


def test_an_alerting_tier_keeps_its_rates_past_the_soft_limit(ledger, clock):
    alerting = Limits(requests_per_minute=60, tokens_per_month=100_000)
    spend(ledger, Limits(), 99_000)
    clock.advance(61)
    assert ledger.reserve(1, alerting, estimate(1, 0)).requests_limit == 60
