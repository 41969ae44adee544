"""The admin's list of every user: found by name or email whether or not they have a
user quota, with their tier, the limits in effect (and which are the tier's), live
day and month bars, filters, and one click to give them a user quota."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse

from llm_quota.exceptions import QuotaExceeded
from llm_quota.models import UserQuota
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories
from tests.support.spend import spend

pytestmark = pytest.mark.django_db


def users_url(**query):
    url = reverse("admin:llm_quota_quotauser_changelist")
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def listed(page) -> set[str]:
    """The usernames in a change list's rows."""
    text = page.content.decode()
    return set(re.findall(r'<th class="field-who"><a [^>]*>([^<]+)(?:<br>|</a>)', text))


@pytest.fixture
def people(ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    pro = factories.tier("pro", tokens_per_day=100_000, tokens_per_month=1_000_000)
    free = factories.tier(
        "free", tokens_per_day=1000, tokens_per_month=10_000, is_default=True,
        requests_per_minute=30,
    )  # fmt: skip
    make = get_user_model().objects.create_user
    alice = make("alice", "alice@example.com", "pw-123456")  # no user quota: default tier
    bob = make("bob", "bob@corp.example", "pw-123456")
    UserQuota.objects.create(user=bob, tier=pro, tokens_per_day=50, blocked=True)
    carol = make("carol", "carol@example.com", "pw-123456")
    UserQuota.objects.create(user=carol, tier=free)
    return {"alice": alice, "bob": bob, "carol": carol, "free": free, "pro": pro}


def test_every_user_is_listed_with_tier_and_live_usage_even_without_a_user_quota(
    admin_client, people
):
    spend(people["alice"], 100, 100)  # 500 base tokens, on the default tier

    page = admin_client.get(users_url())

    assert page.status_code == 200
    assert {"alice", "bob", "carol"} <= listed(page)
    text = page.content.decode()
    assert "free (default)" in text
    assert 'aria-label="Today: 500 of 1,000 base tokens (50%)"' in text
    assert 'aria-label="This month: 500 of 10,000 base tokens (5%)"' in text


@pytest.mark.parametrize("term, found", [("ali", {"alice"}), ("corp.example", {"bob"})])
def test_users_are_found_by_username_or_email(admin_client, people, term, found):
    assert listed(admin_client.get(users_url(q=term))) == found


def test_a_day_budget_that_stops_a_user_shows_full_not_a_monthly_one_percent(admin_client, people):
    carol = people["carol"]
    spend(carol, 200, 200)  # 1000: the day's budget, 10% of the month's
    with pytest.raises(QuotaExceeded):
        spend(carol, 10, 10)
    for url in (users_url(), reverse("admin:llm_quota_userquota_changelist")):
        text = admin_client.get(url).content.decode()
        assert 'aria-label="Today: 1,000 of 1,000 base tokens (100%)"' in text
        assert 'aria-label="This month: 1,000 of 10,000 base tokens (10%)"' in text


def test_a_users_page_shows_which_limits_are_the_tiers_and_which_their_own(admin_client, people):
    bob = people["bob"]
    text = admin_client.get(
        reverse("admin:llm_quota_quotauser_change", args=[bob.pk])
    ).content.decode()
    assert "bob · bob@corp.example" in text
    assert "<td>50</td><td>this user’s override</td>" in text  # tokens per day
    assert "<td>1,000,000</td><td>from the tier pro</td>" in text  # tokens per month
    assert "pw-123456" not in text and "md5$" not in text  # no password, nor its hash
    assert reverse("admin:llm_quota_userquota_change", args=[bob.llm_quota.pk]) in text


def test_one_click_gives_a_user_without_a_quota_their_own(admin_client, people):
    alice = people["alice"]
    page = admin_client.get(reverse("admin:llm_quota_quotauser_change", args=[alice.pk]))
    text = page.content.decode()
    assert "free (the default tier: no user quota)" in text
    add = reverse("admin:llm_quota_userquota_add") + f"?user={alice.pk}"
    assert add in text and add in admin_client.get(users_url()).content.decode()
    form = admin_client.get(add).content.decode()
    assert f'<option value="{alice.pk}" selected>alice</option>' in form
    free = people["free"]
    assert f'<option value="{free.pk}" selected>free</option>' in form  # the default tier
    response = admin_client.post(add, {"user": alice.pk, "tier": free.pk})
    assert response.status_code == 302
    assert UserQuota.objects.get(user=alice).tier == free


def test_the_user_field_searches_users_as_you_type(admin_client, people):
    form = admin_client.get(reverse("admin:llm_quota_userquota_add")).content.decode()
    assert "admin-autocomplete" in form and 'name="user"' in form
    found = admin_client.get(
        reverse("admin:autocomplete"),
        {"term": "car", "app_label": "llm_quota", "model_name": "userquota", "field_name": "user"},
    ).json()
    assert [r["text"] for r in found["results"]] == ["carol"]


def test_filters_blocked_tier_and_the_months_budget(admin_client, people, ledger):
    assert listed(admin_client.get(users_url(blocked="yes"))) == {"bob"}
    assert listed(admin_client.get(users_url(blocked="no"))) >= {"alice", "carol"}
    # The default tier's users include those without a user quota.
    assert listed(admin_client.get(users_url(tier=people["free"].pk))) >= {"alice", "carol"}
    assert listed(admin_client.get(users_url(tier=people["pro"].pk))) == {"bob"}
    for bad in ({"tier": "abc"}, {"tier": "99999"}, {"month_budget": "x"}, {"blocked": "x"}):
        assert admin_client.get(users_url(**bad)).status_code in (200, 302)  # never a 500

    spend(people["alice"], 200, 200)  # 1000 of 10,000: under the soft limit (80%)
    carol = UserQuota.objects.get(user=people["carol"])
    carol.tokens_per_day = 0  # no day budget for her
    carol.save()
    for _ in range(9):
        spend(people["carol"], 100, 100)  # 4500
    carol.tokens_per_month = 5000  # 90%: past the soft limit, not used up
    carol.save()
    snapshot_usage(ledger=ledger)
    assert listed(admin_client.get(users_url(month_budget="soft"))) == {"carol"}
    assert listed(admin_client.get(users_url(month_budget="used_up"))) == set()
    carol.tokens_per_month = 4500
    carol.save()
    assert listed(admin_client.get(users_url(month_budget="used_up"))) == {"carol"}


def test_the_users_list_is_read_only_and_needs_its_permission(client, people):
    clerk = factories.user()
    clerk.is_staff = True
    clerk.save()
    client.force_login(clerk)
    assert client.get(users_url()).status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_quotauser"))
    assert client.get(users_url()).status_code == 200
    alice = people["alice"]
    change = reverse("admin:llm_quota_quotauser_change", args=[alice.pk])
    client.post(change, {"username": "mallory"})
    alice.refresh_from_db()
    assert alice.username == "alice"
    assert client.get(reverse("admin:llm_quota_quotauser_add")).status_code == 403
    delete = reverse("admin:llm_quota_quotauser_delete", args=[alice.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    # Giving a user a quota needs the user quota's own permission.
    add = reverse("admin:llm_quota_userquota_add") + f"?user={alice.pk}"
    assert add not in client.get(users_url()).content.decode()
    assert client.get(add).status_code == 403


def test_a_share_reads_the_same_on_the_list_and_the_report(admin_client, people, ledger):
    """99.6% is 99% everywhere (rounded down: 100% means refused), and the report's
    top users link to the list that has every user, quota or not."""
    dave = factories.user(people["free"], tokens_per_day=0, tokens_per_month=1000)
    spend(dave, 196, 100)  # 596
    spend(dave, 4, 99)  # 400: 996 of 1000
    snapshot_usage(ledger=ledger)
    listing = admin_client.get(users_url()).content.decode()
    assert 'aria-label="This month: 996 of 1,000 base tokens (99%)"' in listing
    report = admin_client.get(reverse("admin:llm_quota_usage_report")).content.decode()
    assert "(99%)" in report and '<td class="num">99%</td>' in report
    assert "(100%)" not in report and ">100%<" not in report
    assert f'href="{users_url()}?q={dave.username}"' in report


def test_without_a_searchable_user_admin_the_user_field_falls_back_to_the_id_box(
    admin_client, people, monkeypatch
):
    """A project that does not register a user admin (or one with no search_fields)
    still gets a working form: Django's autocomplete would fail its system check."""
    from django.contrib import admin

    monkeypatch.delitem(admin.site._registry, get_user_model())
    form = admin_client.get(reverse("admin:llm_quota_userquota_add")).content.decode()
    assert "admin-autocomplete" not in form and '<input type="text" name="user"' in form


def test_the_tier_form_says_what_the_soft_limit_does(admin_client, people):
    url = reverse("admin:llm_quota_tier_change", args=[people["free"].pk])
    text = admin_client.get(url).content.decode()
    assert "soft_limit_crossed signal" in text and "Upgrade URL" in text


def test_the_user_quota_list_leads_to_every_user(admin_client, people):
    """It lists only users with a row: "0 user quotas" must not look like "no users"."""
    UserQuota.objects.all().delete()
    text = admin_client.get(reverse("admin:llm_quota_userquota_changelist")).content.decode()
    assert f'href="{users_url()}">All users</a>' in text
    assert "All users, with or without a user quota, are under Users." in text
    assert "Search by username, email or name." in admin_client.get(users_url()).content.decode()
