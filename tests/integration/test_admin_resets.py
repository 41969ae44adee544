"""The admin's resets, beyond the user's own counters: a user's API keys go with the
user's reset, and a team has its own reset (confirmation, snapshot, history), for
those with the right to change teams only (real Redis)."""

from __future__ import annotations

import json

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from llm_quota import quota_guard
from llm_quota.models import (
    ApiKeyUsageSnapshot,
    DaySnapshot,
    Team,
    TeamMembership,
    TeamUsageSnapshot,
    UserQuota,
)
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories
from tests.support.api_keys import api_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    free = factories.tier("free", tokens_per_month=10**6, is_default=True)
    team = Team.objects.create(slug="acme", name="Acme", tier=factories.tier("team"))
    return free, team


def chat(bearer):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    return Client().post(
        "/v1/chat/completions", json.dumps(body), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {bearer}",
    )  # fmt: skip


def spend_in_team(user, team, prompt=100, completion=100):
    with quota_guard(user, model="gpt-4o", prompt_tokens=prompt, max_tokens=100, team=team) as q:
        q.settle({"prompt_tokens": prompt, "completion_tokens": completion})


def test_a_users_reset_resets_their_keys_so_a_key_budget_no_longer_refuses(
    admin_client, world, ledger
):
    free, _ = world
    alice = factories.user(free)
    key, plaintext = api_key(alice, tokens_per_month=150)
    assert chat(plaintext).status_code == 200
    refused = chat(plaintext)
    assert refused.status_code == 429 and "key.tokens_per_month" in refused.content.decode()
    snapshot_usage(ledger=ledger)
    row = ApiKeyUsageSnapshot.objects.get(api_key=key)
    assert row.base_tokens > 0 and row.day_base_tokens > 0
    assert DaySnapshot.objects.get(user=alice).base_tokens > 0
    quota = UserQuota.objects.get(user=alice)

    admin_client.post(
        reverse("admin:llm_quota_userquota_changelist"),
        {"action": "reset_period_usage", "_selected_action": [quota.pk], "post": "yes"},
    )

    assert ledger.key_usage(alice.pk, key.pk).tokens_this_month == 0
    row = ApiKeyUsageSnapshot.objects.get(api_key=key)
    # The day is forgiven in the database too: a Redis loss must not bring it back.
    assert (row.base_tokens, row.day_base_tokens) == (0, 0)
    assert DaySnapshot.objects.get(user=alice).base_tokens == 0
    assert chat(plaintext).status_code == 200
    entry = LogEntry.objects.get(object_id=str(quota.pk))
    assert f"API keys reset with it ({key.prefix}: " in entry.get_change_message()


def test_a_team_reset_asks_first_then_records_and_forgives_the_teams_month(
    admin_client, world, ledger
):
    _, team = world
    alice = factories.user()
    TeamMembership.objects.create(team=team, user=alice)
    spend_in_team(alice, team)  # 100 + 400 = 500, snapshotted
    snapshot_usage(ledger=ledger)
    spend_in_team(alice, team, 10, 10)  # 50 more, only in Redis
    url = reverse("admin:llm_quota_team_changelist")
    selected = {"action": "reset_team_usage", "_selected_action": [team.pk]}

    page = admin_client.post(url, selected)

    text = page.content.decode()
    assert page.status_code == 200 and "Yes, I’m sure" in text and "550" in text
    assert ledger.team_usage(team.pk).tokens_this_month == 550

    assert admin_client.post(url, {**selected, "post": "yes"}).status_code == 302

    usage = ledger.team_usage(team.pk)
    assert (usage.tokens_this_month, usage.by_member) == (0, [])
    assert ledger.usage(alice.pk).tokens_this_month == 550  # the member's own spend stays
    row = TeamUsageSnapshot.objects.get(team=team)
    assert (row.base_tokens, row.by_member, row.day_base_tokens) == (0, {}, 0)
    entry = LogEntry.objects.get(object_id=str(team.pk))
    assert "2 requests, 550 base tokens" in entry.get_change_message()
    snapshot_usage(ledger=ledger)  # the reset holds through the next run
    assert TeamUsageSnapshot.objects.get(team=team).base_tokens == 0


def test_a_team_reset_needs_the_right_to_change_teams(client, world, ledger):
    _, team = world
    alice = factories.user()
    TeamMembership.objects.create(team=team, user=alice)
    spend_in_team(alice, team)
    clerk = factories.user()
    clerk.is_staff = True
    clerk.save()
    clerk.user_permissions.add(Permission.objects.get(codename="view_team"))
    client.force_login(clerk)
    client.post(
        reverse("admin:llm_quota_team_changelist"),
        {"action": "reset_team_usage", "_selected_action": [team.pk], "post": "yes"},
    )
    assert ledger.team_usage(team.pk).tokens_this_month == 500
    assert not LogEntry.objects.filter(object_id=str(team.pk)).exists()


def test_team_snapshots_are_listed_read_only(admin_client, world, ledger):
    _, team = world
    alice = factories.user()
    TeamMembership.objects.create(team=team, user=alice)
    spend_in_team(alice, team)
    snapshot_usage(ledger=ledger)
    row = TeamUsageSnapshot.objects.get(team=team)
    listing = admin_client.get(reverse("admin:llm_quota_teamusagesnapshot_changelist"))
    assert listing.status_code == 200 and "acme" in listing.content.decode().lower()
    change = reverse("admin:llm_quota_teamusagesnapshot_change", args=[row.pk])
    admin_client.post(change, {"base_tokens": "1"})
    assert TeamUsageSnapshot.objects.get(pk=row.pk).base_tokens == 500
    assert admin_client.get(reverse("admin:llm_quota_teamusagesnapshot_add")).status_code == 403
