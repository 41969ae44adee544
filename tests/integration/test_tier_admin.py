"""Tiers and user quotas in the admin: overrides that inherit or lift a limit, the
first tier, ``DEFAULT_TIER``, and the check that no tier exists."""

from __future__ import annotations

import pytest
from django.urls import reverse

from llm_quota.exceptions import QuotaExceeded
from llm_quota.models import UserQuota
from llm_quota.rules.policy import policy_for
from tests.support import factories
from tests.support.spend import spend

pytestmark = pytest.mark.django_db


def quota_form(user, tier, **overrides):
    return {"user": user.pk, "tier": tier.pk, **overrides}


def test_a_zero_override_lifts_one_limit_for_one_user_and_empty_inherits(admin_client, ledger):
    free = factories.tier("free", is_default=True, requests_per_minute=10, tokens_per_month=300)
    factories.price("gpt-4o", "1", "1", default_max_output_tokens=100)
    user = factories.user()
    add = reverse("admin:llm_quota_userquota_add")
    response = admin_client.post(add, quota_form(user, free, tokens_per_month="0"))
    assert response.status_code == 302
    limits = policy_for(user).limits
    assert limits.tokens_per_month is None  # 0: unlimited for this user
    assert limits.requests_per_minute == 10  # empty: the tier's
    assert UserQuota.objects.get(user=user).monthly_budget is None
    for _ in range(3):
        spend(user, 150, 10)  # 480 in all, past the tier's 300: none refused
    other = factories.user(free)
    spend(other, 150, 10)
    with pytest.raises(QuotaExceeded):
        spend(other, 150, 10)  # the tier's 300 still binds everyone else


def test_override_help_text_says_empty_inherits_and_zero_lifts(admin_client):
    page = admin_client.get(reverse("admin:llm_quota_userquota_add")).content.decode()
    assert "Empty means unlimited" not in page
    assert page.count("Empty: the tier") == 6 and page.count("0: unlimited for this user") == 6


def test_a_positive_override_replaces_the_tier_value(ledger):
    free = factories.tier("free", is_default=True, tokens_per_month=1000)
    user = factories.user(free, tokens_per_month=50)
    assert policy_for(user).limits.tokens_per_month == 50
