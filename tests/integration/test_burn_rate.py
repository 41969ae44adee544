"""The burn-rate breaker (contract §11) in the ledger, against a real Redis, on a
pinned clock: the baseline settle keeps, the trip inside reserve, the pause, resume."""

from __future__ import annotations

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
    decisions = [spend(ledger, BREAKER, 300) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    tripped = decisions[3]
    assert tripped.limit == "burn_rate_exceeded" and tripped.burn_tripped and tripped.is_budget
    assert tripped.retry_after == 600
    assert not decisions[4].burn_tripped  # paused already: the trip is reported once
    clock.advance(599)
    assert ledger.reserve(1, BREAKER, estimate(1, 0)).retry_after == 1
    clock.advance(1)
    assert ledger.reserve(1, BREAKER, estimate(1, 0)).allowed


def test_the_breaker_is_off_when_any_of_its_settings_is_none(ledger):
    for off in (Limits(burn_multiplier=10, burn_floor=1_000), Limits()):
        assert all(spend(ledger, off, 300, uid=2).allowed for _ in range(10))


def test_a_caller_with_a_busy_baseline_is_not_paused_at_its_usual_pace(ledger, clock):
    # A busy day: 4,000 base tokens in one minute, then quiet. Once that 5-minute
    # bucket closes, 4,000 a minute is this caller's baseline. (Settle keeps the
    # baseline whether the tier's breaker is on or not.)
    for _ in range(10):
        assert spend(ledger, Limits(), 400).allowed
    clock.advance(3600)
    # Ten times that in a minute is still allowed, one more request is not.
    decisions = [spend(ledger, BREAKER, 4_000) for _ in range(11)]
    assert all(d.allowed for d in decisions[:10])
    assert decisions[10].limit == "burn_rate_exceeded"
    state = ledger.burn_state(1)
    assert state.paused and state.baseline_per_minute == 4_000


def test_the_baseline_decays_over_days(ledger, clock):
    for _ in range(10):
        spend(ledger, Limits(), 400)
    clock.advance(600)
    spend(ledger, Limits(), 1)  # closes the busy bucket
    clock.advance(7 * 86400)  # a week of silence: two half-lives
    assert ledger.burn_state(1).baseline_per_minute == 4_000 // 4


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
    assert all(spend(ledger, BREAKER, 300).allowed for _ in range(3))
    assert spend(ledger, BREAKER, 300).limit == "burn_rate_exceeded"


def test_another_refusal_is_not_a_trip(ledger):
    limits = Limits(tokens_per_day=500, burn_multiplier=10, burn_floor=450, burn_pause=600)
    assert spend(ledger, limits, 400).allowed
    refused = spend(ledger, limits, 400)  # 800 in the minute, but the day refuses first
    assert refused.limit == "tokens_per_day" and not refused.burn_tripped
