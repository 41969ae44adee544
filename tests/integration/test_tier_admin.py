"""Tiers and user quotas in the admin: overrides that inherit or lift a limit, the
first tier, ``DEFAULT_TIER``, and the check that no tier exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.urls import reverse

from llm_quota.exceptions import QuotaExceeded
from llm_quota.models import Tier, UserQuota
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


def tier_data(name, **fields):
    data = {"name": name, "scopes": "llm:chat usage:read", "soft_limit_percent": 80,
            "soft_limit_mode": "alert"}  # fmt: skip
    data.update(fields)
    return data


def test_the_first_tier_is_saved_without_ticking_default_and_becomes_the_default(
    admin_client, ledger
):
    response = admin_client.post(
        reverse("admin:llm_quota_tier_add"), tier_data("starter", tokens_per_month=1000)
    )
    assert response.status_code == 302
    assert Tier.objects.get(name="starter").is_default
    assert policy_for(factories.user()).tier == "starter"


def test_default_tier_setting_applies_when_no_tier_is_marked_default(
    admin_client, ledger, settings
):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "DEFAULT_TIER": "basic"}
    pro = factories.tier("pro", is_default=True, tokens_per_month=10_000)
    factories.tier("basic", tokens_per_month=100)
    change = reverse("admin:llm_quota_tier_change", args=[pro.pk])
    response = admin_client.post(change, tier_data("pro", tokens_per_month=10_000))
    assert response.status_code == 302  # unticked: DEFAULT_TIER names a tier
    assert not Tier.objects.filter(is_default=True).exists()
    policy = policy_for(factories.user())
    assert (policy.tier, policy.limits.tokens_per_month) == ("basic", 100)
    # The tier DEFAULT_TIER names is now the one in use: it cannot be deleted.
    basic = Tier.objects.get(name="basic")
    delete = reverse("admin:llm_quota_tier_delete", args=[basic.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403


def test_unticking_the_only_default_names_the_way_out(admin_client, ledger, settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "DEFAULT_TIER": "nobody"}
    pro = factories.tier("pro", is_default=True)
    factories.tier("team")
    change = reverse("admin:llm_quota_tier_change", args=[pro.pk])
    response = admin_client.post(change, tier_data("pro"))
    assert response.status_code == 200
    text = response.content.decode()
    assert "another tier first" not in text and "DEFAULT_TIER setting" in text
    assert Tier.objects.get(name="pro").is_default


def test_plain_check_warns_when_no_tier_applies(settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "DEFAULT_TIER": "basic"}
    assert "llm_quota.W002" in {m.id for m in run_checks()}  # no tier at all
    basic = factories.tier("basic")
    assert "llm_quota.W002" not in {m.id for m in run_checks()}
    factories.tier("pro", is_default=True)
    assert "llm_quota.W020" in {m.id for m in run_checks()}  # DEFAULT_TIER shadowed
    basic.delete()
    assert not {"llm_quota.W002", "llm_quota.W020"} & {m.id for m in run_checks()}


@pytest.mark.django_db(transaction=False)
def test_check_is_quiet_before_the_first_migrate(tmp_path):
    """``check`` (and ``migrate``, which runs it) on a database with no tables yet."""
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "llm_quota.W002" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_the_tier_form_sets_the_runaway_protection_and_an_empty_field_turns_it_off(
    admin_client, ledger
):
    add = reverse("admin:llm_quota_tier_add")
    fields = {"soft_limit_mode": "slow", "soft_limit_percent": 70, "tokens_per_month": 1000,
              "requests_per_minute": 60, "burn_multiplier": "5", "burn_floor": 20_000,
              "burn_pause_seconds": 60}  # fmt: skip
    assert admin_client.post(add, tier_data("careful", **fields)).status_code == 302
    limits = policy_for(factories.user()).limits
    assert (limits.burn_multiplier, limits.burn_floor, limits.burn_pause) == (5.0, 20_000, 60)
    assert limits.slow_soft_percent == 70
    change = reverse("admin:llm_quota_tier_change", args=[Tier.objects.get(name="careful").pk])
    off = {**fields, "burn_floor": "", "soft_limit_mode": "alert", "is_default": "on"}
    assert admin_client.post(change, tier_data("careful", **off)).status_code == 302
    limits = policy_for(factories.user()).limits
    assert limits.burn_floor is None and limits.slow_soft_percent is None
    # Slowing down shrinks rates by the month's budget left: it needs both.
    rateless = tier_data("rateless", soft_limit_mode="slow", tokens_per_month=1000)
    response = admin_client.post(add, rateless)
    assert response.status_code == 200
    assert "Slowing down needs a monthly budget" in response.content.decode()
