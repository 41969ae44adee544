"""The context manager and ``admit`` with tiers, quotas and prices from the database."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from rest_framework.exceptions import NotAuthenticated, Throttled

from llm_quota import quota_guard
from llm_quota.exceptions import (
    BudgetExceeded,
    InsufficientScope,
    ModelNotAllowed,
    QuotaBlocked,
    RateLimited,
    UnknownModel,
)
from llm_quota.rules.estimation import count_output
from llm_quota.signals import quota_refused
from tests.support import factories

pytestmark = pytest.mark.django_db

MSGS = [{"role": "user", "content": "Say hello in five words."}]


@pytest.fixture
def setup(ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    pro = factories.tier("pro", tokens_per_month=10**6)
    free = factories.tier(
        "free",
        requests_per_minute=100,
        tokens_per_month=2000,
        is_default=True,
        allowed_models="gpt-4o*",
        upgrade_to=pro,
        upgrade_url="https://example.com/up",
    )
    return free, pro


def test_guard_reserves_settles_and_reports_usage(setup, ledger):
    user = factories.user()
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=50) as q:
        assert q.max_tokens == 50
        assert ledger.usage(user.pk).reserved == q.reservation.reserved
        q.settle({"prompt_tokens": 20, "completion_tokens": 10})
    usage = ledger.usage(user.pk)
    assert usage.reserved == 0 and usage.tokens_this_month == 20 + 10 * 4


def test_guard_releases_when_the_upstream_was_never_reached(setup, ledger):
    user = factories.user()
    with pytest.raises(httpx.ConnectError):
        with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=50):
            raise httpx.ConnectError("upstream unreachable")
    usage = ledger.usage(user.pk)
    assert usage.reserved == 0 and usage.tokens_this_month == 0


def test_guard_charges_the_estimate_when_an_exception_proves_nothing(setup, ledger):
    """The release rule: a bug after the call may follow a billed answer."""
    user = factories.user()
    with pytest.raises(RuntimeError):
        with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=50) as q:
            raise RuntimeError("the answer could not be parsed")
    usage = ledger.usage(user.pk)
    assert usage.reserved == 0 and usage.tokens_this_month == q.reservation.reserved


def test_guard_without_settle_charges_the_estimate(setup, ledger):
    user = factories.user()
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=50) as q:
        reserved = q.reservation.reserved
    assert ledger.usage(user.pk).tokens_this_month == reserved


def test_budget_refusal_carries_limit_retry_after_and_upgrade(setup, ledger):
    user = factories.user()
    refused = []
    quota_refused.connect(lambda **kw: refused.append(kw), weak=False, dispatch_uid="t")
    try:
        with pytest.raises(BudgetExceeded) as info:
            for _ in range(50):
                with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=100) as q:
                    q.settle({"prompt_tokens": 20, "completion_tokens": 100})
    finally:
        quota_refused.disconnect(dispatch_uid="t")
    exc = info.value
    assert isinstance(exc, Throttled) and exc.status_code == 429
    assert exc.limit == "tokens_per_month" and exc.error_type == "insufficient_quota"
    assert exc.retry_after >= 1 and exc.wait == exc.retry_after
    assert exc.upgrade == {"tier": "pro", "url": "https://example.com/up"}
    assert "tokens_per_month" in str(exc.detail)
    assert refused and refused[-1]["limit"] == "tokens_per_month"


def test_tier_edit_applies_to_the_next_reservation(setup, ledger):
    free, _ = setup
    user = factories.user()
    free.requests_per_minute = 1
    free.save()
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=10) as q:
        q.settle({"prompt_tokens": 1, "completion_tokens": 1})
    with pytest.raises(RateLimited) as info:
        with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=10):
            pass
    assert info.value.limit == "requests_per_minute"
    free.requests_per_minute = None
    free.save()  # the admin saves through the model: the signal invalidates
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=10) as q:
        q.settle({"prompt_tokens": 1, "completion_tokens": 1})


def test_user_quota_overrides_the_tier(setup, ledger):
    free, _ = setup
    user = factories.user(free, tokens_per_month=10)
    with pytest.raises(BudgetExceeded):
        with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=100):
            pass


def test_clamped_guard_hands_back_lower_max_tokens(setup, ledger):
    user = factories.user()
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=10_000) as q:
        assert 16 <= q.max_tokens < 10_000
        assert q.reservation.reserved <= 2000
        q.release()


def test_static_refusals_never_touch_redis(setup, ledger, redis_client):
    free, _ = setup
    blocked = factories.user(free, blocked=True)
    with pytest.raises(QuotaBlocked):
        quota_guard(blocked, model="gpt-4o", messages=MSGS).__enter__()
    with pytest.raises(ModelNotAllowed):
        factories.price("claude-x", "1", "1")
        quota_guard(factories.user(), model="claude-x", messages=MSGS).__enter__()
    with pytest.raises(UnknownModel):
        quota_guard(factories.user(), model="no-such-model", messages=MSGS).__enter__()
    with pytest.raises(NotAuthenticated):
        from django.contrib.auth.models import AnonymousUser

        quota_guard(AnonymousUser(), model="gpt-4o", messages=MSGS).__enter__()
    assert not list(redis_client.scan_iter(match=f"{ledger.keyspace.prefix}:*"))


def test_a_tier_without_the_chat_scope_is_refused_by_the_guard_before_redis(
    setup, ledger, redis_client, transactional_db
):
    # A "viewer" tier: no token limit at all, so only the scope can stop it.
    viewer_tier = factories.tier("viewer", scopes="usage:read")
    viewer = factories.user(viewer_tier)
    blocked = factories.user(setup[0], blocked=True)
    with pytest.raises(InsufficientScope):
        quota_guard(viewer, model="gpt-4o", messages=MSGS).__enter__()
    with pytest.raises(InsufficientScope):
        quota_guard(viewer.pk, model="gpt-4o", messages=MSGS).__enter__()  # a service account
    with pytest.raises(QuotaBlocked):
        quota_guard(blocked, model="gpt-4o", messages=MSGS).__enter__()

    async def call(user):
        try:
            async with quota_guard(user, model="gpt-4o", messages=MSGS):
                raise AssertionError("admitted")
        finally:
            await sync_to_async(connections.close_all)()

    with pytest.raises(InsufficientScope):
        asyncio.run(call(viewer))
    with pytest.raises(QuotaBlocked):
        asyncio.run(call(blocked))
    assert not list(redis_client.scan_iter(match=f"{ledger.keyspace.prefix}:*"))
    # The same guard with the scope granted does reach Redis: the check above could fail.
    viewer_tier.scopes = "usage:read llm:chat"
    viewer_tier.save()  # as the admin saves it: every process sees it
    with quota_guard(viewer, model="gpt-4o", messages=MSGS) as q:
        q.release()
    assert list(redis_client.scan_iter(match=f"{ledger.keyspace.prefix}:*"))


def test_async_guard(setup, ledger, transactional_db):
    user = factories.user()

    async def call():
        async with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=20) as q:
            await q.asettle({"prompt_tokens": 5, "completion_tokens": 5})
        # The ORM ran in Django's sync thread: close its connection as ASGI would.
        await sync_to_async(connections.close_all)()
        return q

    asyncio.run(call())
    assert ledger.usage(user.pk).tokens_this_month == 25


def test_fail_open_admits_unmetered_and_fail_closed_refuses(setup, settings, redis_client):
    import redis

    from llm_quota.exceptions import QuotaUnavailable
    from llm_quota.ledger.default import set_default_ledger
    from llm_quota.ledger.sync_driver import Ledger

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    set_default_ledger(Ledger(dead, prefix="dead"))
    user = factories.user()
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=20) as q:
        assert q.reservation.unmetered
        q.settle({"prompt_tokens": 1, "completion_tokens": 1})
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "FAIL_OPEN": False}
    set_default_ledger(Ledger(dead, prefix="dead"))
    with pytest.raises(QuotaUnavailable) as info:
        with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=20):
            pass
    assert info.value.status_code == 503 and info.value.wait >= 1


@pytest.mark.parametrize(
    "usage",
    [{"prompt_tokens": 1e20, "completion_tokens": 10**20},
     {"prompt_tokens": "5", "completion_tokens": -1}, None],
)  # fmt: skip
def test_a_usage_that_cannot_be_charged_charges_the_reservation_never_zero(setup, ledger, usage):
    """The Python API has no generated text to count: the estimate's prompt and the
    reserved output cap stand in, and the settle script is never handed a bad number."""
    user = factories.user()
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=30) as quota:
        settlement = quota.settle(usage)
    assert settlement.settled and settlement.base_tokens == quota.reservation.reserved
    [row] = ledger.usage(user.pk).by_model
    assert (row.input_tokens, row.output_tokens) == (quota.estimate.prompt_tokens, 30)
    assert ledger.usage(user.pk).reserved == 0


def test_the_generated_text_stands_in_for_a_zero_output_count(setup, ledger):
    user = factories.user()
    text = "one two three four five six seven eight nine ten " * 3  # 150 bytes: >= 2 tokens
    with quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=100) as quota:
        quota.settle({"prompt_tokens": 9, "completion_tokens": 0}, output_text=text)
    [row] = ledger.usage(user.pk).by_model
    assert (row.input_tokens, row.output_tokens) == (9, count_output(text, "gpt-4o"))
