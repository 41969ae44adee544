"""The admin: validated edits, live usage and actions on quotas, read-only snapshots,
the usage page with its charts, CSV export, and who may do what."""

from __future__ import annotations

import csv
import io

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.urls import reverse

from llm_quota import quota_guard
from llm_quota.ledger.default import set_default_ledger
from llm_quota.models import ModelPrice, Tier, UsageSnapshot, UserQuota
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories, periods
from tests.support.spend import spend

pytestmark = pytest.mark.django_db


@pytest.fixture
def setup(ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    pro = factories.tier("pro", tokens_per_month=10_000)
    free = factories.tier("free", tokens_per_month=1000, is_default=True)
    return free, pro


def tier_form(tier, **changes):
    data = {
        "name": tier.name,
        "scopes": tier.scopes,
        "soft_limit_percent": tier.soft_limit_percent,
        "soft_limit_mode": tier.soft_limit_mode,
        "burn_multiplier": tier.burn_multiplier or "",
        "burn_floor": tier.burn_floor or "",
        "burn_pause_seconds": tier.burn_pause_seconds or "",
        "allowed_models": tier.allowed_models,
        "upgrade_url": tier.upgrade_url,
        "is_default": "on" if tier.is_default else "",
        **{name: "" for name in ("requests_per_minute", "tokens_per_minute", "tokens_per_day",
                                 "max_concurrent_requests", "max_tokens_per_request")},
        "tokens_per_month": tier.tokens_per_month or "",
        "upgrade_to": tier.upgrade_to_id or "",
    }  # fmt: skip
    data.update(changes)
    return {k: v for k, v in data.items() if v != ""}


def change(admin_client, tier, **changes):
    url = reverse("admin:llm_quota_tier_change", args=[tier.pk])
    return admin_client.post(url, tier_form(tier, **changes))


def test_editing_a_tiers_monthly_budget_applies_to_the_next_request(admin_client, setup):
    free, _ = setup
    user = factories.user()
    spend(user, 800, 0)
    response = change(admin_client, free, tokens_per_month=2000)
    assert response.status_code == 302
    free.refresh_from_db()
    assert free.tokens_per_month == 2000
    spend(user, 800, 0)  # refused under the old budget of 1000


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tokens_per_month", "-5", "greater than or equal to"),
        ("requests_per_minute", "0", "greater than or equal to 1"),
        ("allowed_models", "gpt-4o\n[z-a]", "empty character range"),
        ("allowed_models", "gpt 4o", "can never match"),
        ("soft_limit_percent", "-1", "greater than or equal to"),
    ],
)
def test_tier_edits_are_validated(admin_client, setup, field, value, message):
    free, _ = setup
    response = change(admin_client, free, **{field: value})
    assert response.status_code == 200  # the form again, with the error
    assert message in response.content.decode()
    free.refresh_from_db()
    assert free.tokens_per_month == 1000 and free.allowed_models == ""


def test_exactly_one_tier_is_the_default(admin_client, setup, settings):
    free, pro = setup
    # DEFAULT_TIER names no tier here, so the only default cannot be unticked.
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "DEFAULT_TIER": "nobody"}
    refused = change(admin_client, free, is_default="")
    assert refused.status_code == 200 and "need a default tier" in refused.content.decode()
    moved = change(admin_client, pro, is_default="on")
    assert moved.status_code == 302
    assert list(Tier.objects.filter(is_default=True).values_list("name", flat=True)) == ["pro"]
    # The default tier cannot be deleted; the others can.
    pro.refresh_from_db()
    delete = reverse("admin:llm_quota_tier_delete", args=[pro.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403


def test_model_price_edits_are_validated(admin_client, setup):
    add = reverse("admin:llm_quota_modelprice_add")
    base = {
        "input_multiplier": "1", "output_multiplier": "4", "default_max_output_tokens": "100",
        "enabled": "on",
    }  # fmt: skip
    for model, encoding, message in (
        ("gpt 5", "", "A model name is"),
        ("gpt-5", "cl200k_nonsense", "Unknown tiktoken encoding"),
        ("claude-[z-a]", "", "empty character range"),
    ):
        response = admin_client.post(add, {**base, "model": model, "encoding": encoding})
        assert response.status_code == 200 and message in response.content.decode()
    negative = admin_client.post(add, {**base, "model": "gpt-5", "output_multiplier": "-1"})
    assert "greater than or equal to 0" in negative.content.decode()
    ok = admin_client.post(add, {**base, "model": "gpt-5*", "encoding": "o200k_base"})
    assert ok.status_code == 302 and ModelPrice.objects.filter(model="gpt-5*").exists()


def test_quota_list_shows_live_usage_from_redis(admin_client, setup):
    free, _ = setup
    user = factories.user(free)
    spend(user, 100, 100)  # 500 of 1000
    held = quota_guard(user, model="gpt-4o", prompt_tokens=10, max_tokens=10).__enter__()  # 50

    page = admin_client.get(reverse("admin:llm_quota_userquota_changelist")).content.decode()
    quota = UserQuota.objects.get(user=user)
    detail = admin_client.get(reverse("admin:llm_quota_userquota_change", args=[quota.pk]))

    # Used this month, reservations included; what remains.
    assert 'aria-label="This month: 550 of 1,000 base tokens (55%)"' in page
    assert '<td class="field-remaining">450</td>' in page
    assert "<td>50 (1 call)</td>" in detail.content.decode()  # reserved
    held.release()


def test_quota_page_shows_the_durability_window(admin_client, setup, ledger):
    free, _ = setup
    user = factories.user(free)
    spend(user, 100, 100)  # 500
    snapshot_usage(ledger=ledger)
    spend(user, 10, 10)  # 50 not yet in the database
    quota = UserQuota.objects.get(user=user)
    page = admin_client.get(reverse("admin:llm_quota_userquota_change", args=[quota.pk]))
    text = page.content.decode()
    assert "Not yet snapshotted" in text and "<td>50</td>" in text
    assert "Last snapshot run" in text and "1 users read" in text


def test_quota_actions_move_block_and_reset(admin_client, setup, ledger):
    free, pro = setup
    alice, bob = factories.user(free), factories.user(free)
    spend(alice, 100, 100)
    snapshot_usage(ledger=ledger)
    ids = [str(q.pk) for q in UserQuota.objects.all()]
    url = reverse("admin:llm_quota_userquota_changelist")

    def act(action, selected):
        return admin_client.post(url, {"action": action, "_selected_action": selected})

    assert act(f"move_to_tier_{pro.pk}", ids).status_code == 302
    assert set(UserQuota.objects.values_list("tier__name", flat=True)) == {"pro"}

    bob_quota = UserQuota.objects.get(user=bob)
    act("block_users", [str(bob_quota.pk)])
    assert UserQuota.objects.get(user=bob).blocked
    act("unblock_users", [str(bob_quota.pk)])
    assert not UserQuota.objects.get(user=bob).blocked

    alice_quota = UserQuota.objects.get(user=alice)
    admin_client.post(
        url, {"action": "reset_period_usage", "_selected_action": [alice_quota.pk], "post": "yes"}
    )
    usage = ledger.usage(alice.pk)
    assert (usage.tokens_this_month, usage.tokens_today, usage.by_model) == (0, 0, [])
    assert UsageSnapshot.objects.get(user=alice).base_tokens == 0
    # The reset holds through the next snapshot, and a later restore cannot undo it.
    snapshot_usage(ledger=ledger)
    assert UsageSnapshot.objects.get(user=alice).base_tokens == 0


def test_snapshots_are_read_only(admin_client, setup, ledger):
    user = factories.user()
    spend(user, 100, 100)
    snapshot_usage(ledger=ledger)
    row = UsageSnapshot.objects.get()
    assert admin_client.get(reverse("admin:llm_quota_usagesnapshot_add")).status_code == 403
    url = reverse("admin:llm_quota_usagesnapshot_change", args=[row.pk])
    assert admin_client.get(url).status_code == 200  # viewable
    admin_client.post(url, {"base_tokens": "1"})
    assert UsageSnapshot.objects.get().base_tokens == 500
    delete = reverse("admin:llm_quota_usagesnapshot_delete", args=[row.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    listing = admin_client.get(
        reverse("admin:llm_quota_usagesnapshot_changelist") + "?model=gpt-4o"
    )
    assert listing.status_code == 200 and "Usage charts" in listing.content.decode()


def test_csv_export_of_selected_and_of_all_rows(admin_client, setup, ledger, clock):
    alice, bob = factories.user(), factories.user()
    spend(alice, 100, 100)
    spend(bob, 10, 10)
    snapshot_usage(ledger=ledger)
    url = reverse("admin:llm_quota_usagesnapshot_changelist")
    selected = [str(UsageSnapshot.objects.get(user=alice).pk)]
    response = admin_client.post(url, {"action": "export_csv", "_selected_action": selected})
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert response["Content-Type"] == "text/csv"
    assert rows[0][:4] == ["user_id", "username", "period", "model"]
    assert rows[1][:9] == [
        str(alice.pk), alice.username, str(periods.month_start(clock)), "gpt-4o",
        "1", "100", "100", "500", "0.001250",
    ]  # fmt: skip
    assert len(rows) == 2
    everything = admin_client.get(reverse("admin:llm_quota_usage_csv") + "?months=12")
    assert len(list(csv.reader(io.StringIO(b"".join(everything.streaming_content).decode())))) == 3


def test_usage_page_draws_spend_per_model_and_top_users(admin_client, setup, ledger, clock):
    free, _ = setup
    factories.price("gpt-4o-mini", "0.06", "0.24", default_max_output_tokens=100)
    alice, bob = factories.user(free), factories.user()
    spend(alice, 100, 100)
    spend(bob, 1000, 100, model="gpt-4o-mini")
    snapshot_usage(ledger=ledger)
    UsageSnapshot.objects.create(
        user=alice,
        period=periods.month_start(clock, back=2),
        model="gpt-4o",
        requests=3,
        base_tokens=700,
    )

    page = admin_client.get(reverse("admin:llm_quota_usage_report"))

    text = page.content.decode()
    assert page.status_code == 200
    assert text.count('<svg class="llmq-chart"') == 3
    earlier, now = periods.month_start(clock, back=2), periods.month_start(clock)
    assert f"{earlier:%b %Y} · gpt-4o" in text and f"{now:%b %Y} · gpt-4o-mini" in text
    assert alice.username in text and "(50%)" in text  # 500 of her 1000 budget
    assert "Durability window" in text and "2 users read" in text


def test_admin_edits_need_admin_rights(client, setup):
    free, _ = setup
    url = reverse("admin:llm_quota_tier_change", args=[free.pk])
    # Not staff: sent to the login page.
    assert client.get(url).status_code == 302
    # Staff with view permission only: may look, may not edit or reset.
    clerk = factories.user()
    clerk.is_staff = True
    clerk.save()
    clerk.user_permissions.add(
        Permission.objects.get(codename="view_tier"),
        Permission.objects.get(codename="view_userquota"),
        Permission.objects.get(codename="view_usagesnapshot"),
    )
    client.force_login(clerk)
    assert client.get(url).status_code == 200
    client.post(url, tier_form(free, tokens_per_month=999_999))
    free.refresh_from_db()
    assert free.tokens_per_month == 1000
    quota = UserQuota.objects.create(user=factories.user(), tier=free)
    client.post(
        reverse("admin:llm_quota_userquota_changelist"),
        {"action": "block_users", "_selected_action": [str(quota.pk)]},
    )
    assert not UserQuota.objects.get(pk=quota.pk).blocked
    assert client.get(reverse("admin:llm_quota_usage_report")).status_code == 200


def test_reset_asks_first_then_records_the_unsnapshotted_usage_it_forgives(
    admin_client, setup, ledger
):
    free, _ = setup
    alice = factories.user(free)
    spend(alice, 100, 100)  # 500, snapshotted
    snapshot_usage(ledger=ledger)
    spend(alice, 10, 10)  # 50 more, only in Redis
    quota = UserQuota.objects.get(user=alice)
    url = reverse("admin:llm_quota_userquota_changelist")
    selected = {"action": "reset_period_usage", "_selected_action": [quota.pk]}

    page = admin_client.post(url, selected)  # the intermediate page: nothing reset yet

    text = page.content.decode()
    assert page.status_code == 200 and "Yes, I’m sure" in text
    assert '<input type="hidden" name="post" value="yes">' in text and "550" in text
    assert ledger.usage(alice.pk).tokens_this_month == 550

    done = admin_client.post(url, {**selected, "post": "yes"})

    assert done.status_code == 302
    assert ledger.usage(alice.pk).tokens_this_month == 0
    assert UsageSnapshot.objects.get(user=alice).base_tokens == 0
    # The 50 not yet snapshotted were taken into the record before the reset.
    entry = LogEntry.objects.get(object_id=str(quota.pk))
    assert "gpt-4o: 2 requests, 550 base tokens" in entry.get_change_message()


def test_admin_shows_durations_as_a_person_reads_them(admin_client, setup, ledger, clock, settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "SNAPSHOT_INTERVAL": 97143}
    set_default_ledger(ledger)  # a settings change drops it; keep the pinned clock
    free, _ = setup
    user = factories.user(free)
    spend(user, 10, 10)
    snapshot_usage(ledger=ledger)
    quota = UserQuota.objects.get(user=user)

    page = admin_client.get(reverse("admin:llm_quota_userquota_change", args=[quota.pk]))
    report = admin_client.get(reverse("admin:llm_quota_usage_report"))

    # The pinned clock is 27 Nov 2099, 12:00 UTC: the day ends in 12 h, the month in 3.5 d.
    # 97143 s is 1 day, 2 hours and 59 minutes: shown rounded up, as refusals say it.
    text = page.content.decode()
    assert "<td>12 hours</td>" in text and "<td>3 days, 12 hours</td>" in text
    assert "every 1 day, 3 hours" in text and "97143" not in text
    assert "at most\n    1 day, 3 hours of it" in report.content.decode()


def test_prices_are_shown_in_usd_per_million_tokens(admin_client, setup):
    # setup: gpt-4o at 1 in / 4 out, and a base token at the default $2.50 per million
    listing = admin_client.get(reverse("admin:llm_quota_modelprice_changelist")).content.decode()
    assert "Input, USD / 1M" in listing
    assert "<td class=\"field-input_usd\">$2.5</td>" in listing
    assert "<td class=\"field-output_usd\">$10</td>" in listing
    assert "<td class=\"field-cached_input_usd\">—</td>" in listing
