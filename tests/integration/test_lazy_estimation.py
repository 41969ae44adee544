"""A huge prompt is tokenized only when its bounds leave the answer open.

Reserved first on its byte count (an upper bound) with its lower bound as a probe: far
under the budget it is admitted on the bound, far over it is refused on the lower
bound, and only in between is it counted. The tests watch ``count_prompt`` to see
which happened, and read the real ledger to see what was reserved.
"""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from llm_quota import quota_guard
from llm_quota.exceptions import BudgetExceeded
from llm_quota.quota import admission
from llm_quota.rules.accounting import ActualUsage, Limits
from llm_quota.rules.estimation import count_messages, count_prompt, prompt_bounds
from tests.support import factories
from tests.support.factories import estimate

pytestmark = pytest.mark.django_db

HUGE = [{"role": "user", "content": "budget " * 20_000}]  # ~140 KB, ~20k tokens
LOWER, UPPER = prompt_bounds(HUGE)
EXACT = count_messages(HUGE, "gpt-4o")
OUTPUT = 100


@pytest.fixture
def counts(monkeypatch):
    """How many times the gate tokenized a prompt."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return count_prompt(*args, **kwargs)

    monkeypatch.setattr(admission, "count_prompt", spy)
    return calls


@pytest.fixture
def user_with(ledger):
    factories.price("gpt-4o", "1", "1", default_max_output_tokens=OUTPUT)

    def make(**limits):
        return factories.user(factories.tier(**limits))

    return make


def test_the_bounds_bracket_the_count_and_pass_the_threshold():
    assert LOWER < EXACT < UPPER and UPPER > admission.LAZY_COUNT_ABOVE


def test_far_under_the_budget_the_byte_bound_is_reserved_uncounted(user_with, ledger, counts):
    user = user_with(tokens_per_month=10**7)
    with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
        assert not counts
        assert not q.estimate.prompt_exact
        assert q.reservation.reserved == UPPER + OUTPUT
        assert q.max_tokens == OUTPUT
        q.settle({"prompt_tokens": EXACT, "completion_tokens": 7})
    usage = ledger.usage(user.pk)
    assert (usage.tokens_this_month, usage.reserved) == (EXACT + 7, 0)


def test_far_over_the_budget_the_lower_bound_refuses_uncounted(user_with, ledger, counts):
    user = user_with(tokens_per_month=LOWER // 2, requests_per_minute=10)
    with pytest.raises(BudgetExceeded) as refused:
        quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT).admit()
    assert refused.value.limit == "tokens_per_month"
    assert not counts
    usage = ledger.usage(user.pk)
    assert (usage.tokens_this_month, usage.requests_this_minute) == (0, 0)


def test_in_between_the_prompt_is_counted_once_and_reserved_exactly(user_with, ledger, counts):
    user = user_with(tokens_per_month=EXACT + OUTPUT + 10)
    with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
        assert len(counts) == 1
        assert q.estimate.prompt_exact
        assert q.reservation.reserved == EXACT + OUTPUT
        # The refused attempt on the bound counted no request.
        assert ledger.usage(user.pk).requests_this_minute == 1
        q.release()


def test_in_between_with_clamping_the_count_gets_the_clamped_output(user_with, ledger, counts):
    user = user_with(tokens_per_month=EXACT + 40)
    with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
        assert len(counts) == 1
        assert q.max_tokens == 40 and q.reservation.reserved == EXACT + 40
        q.release()


def test_lower_bound_refused_only_without_clamping_room(user_with, counts):
    # The lower bound plus the least output worth clamping to (16) does not fit.
    user = user_with(tokens_per_month=LOWER + 10)
    with pytest.raises(BudgetExceeded):
        quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT).admit()
    assert not counts


def test_a_per_request_cap_below_the_bound_is_decided_on_the_count(user_with, counts):
    user = user_with(tokens_per_month=10**7, max_tokens_per_request=EXACT + OUTPUT)
    with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
        assert len(counts) == 1
        assert q.reservation.reserved == EXACT + OUTPUT
        q.release()


def test_near_the_context_window_the_prompt_is_counted(ledger, counts):
    factories.price("gpt-4o", "1", "1", context_window=EXACT + OUTPUT + 5)
    user = factories.user(factories.tier(tokens_per_month=10**7))
    with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
        assert counts and q.estimate.prompt_exact
        q.release()


def test_no_usage_reported_charges_the_counted_prompt_not_the_bound(user_with, ledger, counts):
    user = user_with(tokens_per_month=10**7)
    with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
        q.settle_output("hello there")
    charged = ledger.usage(user.pk).tokens_this_month
    assert EXACT < charged < EXACT + 10


def test_small_prompts_are_always_counted(user_with, counts):
    user = user_with(tokens_per_month=10**7)
    small = [{"role": "user", "content": "hi"}]
    with quota_guard(user, model="gpt-4o", messages=small, max_tokens=5) as q:
        assert len(counts) == 1 and q.estimate.prompt_exact
        q.release()


def test_async_far_under_the_budget_is_not_counted(user_with, ledger, counts, transactional_db):
    user = user_with(tokens_per_month=10**7)

    async def call():
        async with quota_guard(user, model="gpt-4o", messages=HUGE, max_tokens=OUTPUT) as q:
            reserved = q.reservation.reserved
            await q.asettle({"prompt_tokens": EXACT, "completion_tokens": 3})
        # The ORM ran in Django's sync thread: close its connection as ASGI would.
        await sync_to_async(connections.close_all)()
        return reserved

    assert asyncio.run(call()) == UPPER + OUTPUT
    assert not counts
    assert ledger.usage(user.pk).tokens_this_month == EXACT + 3


# -- the probe itself, on the ledger ---------------------------------------------------


def test_a_probe_names_the_limit_that_refuses_the_lower_bound_too(ledger):
    limits = Limits(tokens_per_month=1000, tokens_per_minute=600)
    refused = ledger.reserve(1, limits, estimate(5000, 10), clamp=False, probe_prompt_tokens=800)
    assert not refused.allowed and refused.probe_limit == "tokens_per_minute"
    assert refused.probe_retry_after > 0
    fits = ledger.reserve(1, limits, estimate(5000, 10), clamp=False, probe_prompt_tokens=500)
    assert not fits.allowed and fits.probe_limit is None
    usage = ledger.usage(1)
    assert (usage.tokens_this_month, usage.requests_this_minute, usage.reserved) == (0, 0, 0)


def test_a_probe_counts_the_request_rate_even_when_tokens_would_fit(ledger):
    limits = Limits(requests_per_minute=1, tokens_per_month=10**6)
    ledger.settle(ledger.reserve(1, limits, estimate(10, 10)).reservation, ActualUsage(10, 10))
    refused = ledger.reserve(1, limits, estimate(50, 10), clamp=False, probe_prompt_tokens=5)
    assert refused.probe_limit == "requests_per_minute"
