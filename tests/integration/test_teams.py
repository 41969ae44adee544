"""Teams end to end on the test client: who pays (the key's team, OpenAI-Organization,
the only team), team limits refusing with their names and the team tier's upgrade, the
team endpoints, and no SQL on a warm request (real Redis)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from django.test import Client
from django.urls import reverse

from llm_quota.ledger.default import get_ledger
from llm_quota.models import Team, TeamMembership, TeamUsageSnapshot
from llm_quota.rules.periods import add_months
from tests.support import factories
from tests.support.api_keys import api_key
from tests.support.gateway import access_token

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def world(quota_prefix):
    factories.price("gpt-4o", "1", "4")
    personal = factories.tier("free", is_default=True, tokens_per_month=10**6)
    bigger = factories.tier("enterprise", tokens_per_month=10**7)
    team_tier = factories.tier("team", tokens_per_month=10**6, upgrade_to=bigger,
                               upgrade_url="https://example.com/up")  # fmt: skip
    acme = Team.objects.create(slug="acme", name="Acme", tier=team_tier)
    globex = Team.objects.create(slug="globex", name="Globex", tier=team_tier)
    return personal, acme, globex


def member(team, role="member", user=None):
    user = user or factories.user()
    TeamMembership.objects.create(team=team, user=user, role=role)
    return user


def chat(bearer, org=None, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {bearer}"}
    if org is not None:
        headers["HTTP_OPENAI_ORGANIZATION"] = org
    response = Client().post(
        "/v1/chat/completions", json.dumps({**BODY, **extra}), content_type="application/json",
        **headers,
    )  # fmt: skip
    if response.streaming:
        b"".join(response.streaming_content)
    return response


def team_tokens(team):
    return get_ledger().team_usage(team.pk).tokens_this_month


def test_a_members_only_team_pays_without_being_named(world):
    _, acme, _ = world
    user = member(acme)
    assert chat(access_token(user)).status_code == 200
    assert team_tokens(acme) == get_ledger().usage(user.pk).tokens_this_month > 0


def test_openai_organization_picks_one_of_several_teams(world):
    _, acme, globex = world
    user = member(globex, user=member(acme))
    assert chat(access_token(user)).status_code == 200  # two teams, none named: the user alone
    assert team_tokens(acme) == team_tokens(globex) == 0
    assert chat(access_token(user), org="globex").status_code == 200
    assert team_tokens(globex) > 0 and team_tokens(acme) == 0


def test_naming_a_team_one_is_not_in_is_403_team_not_allowed(world):
    _, acme, globex = world
    user = member(acme)
    for org in ("globex", "no-such-team"):
        refused = chat(access_token(user), org=org)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "team_not_allowed"
    assert team_tokens(globex) == 0


def test_a_keys_team_pays_and_a_key_cannot_name_a_team_its_user_is_not_in(world):
    _, acme, globex = world
    user = member(globex, user=member(acme))
    key, plaintext = api_key(user, team=acme)
    assert chat(plaintext).status_code == 200
    assert team_tokens(acme) > 0 and team_tokens(globex) == 0
    refused = Client().post(
        "/api/llm-quota/keys/", json.dumps({"name": "x", "team": "initech"}),
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {access_token(user)}",
    )  # fmt: skip
    assert refused.status_code == 400
    created = Client().post(
        "/api/llm-quota/keys/", json.dumps({"name": "x", "team": "globex"}),
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {access_token(user)}",
    )  # fmt: skip
    assert created.status_code == 201 and created.json()["team"] == "globex"


def test_leaving_the_team_stops_its_key_and_its_name_at_once(world):
    _, acme, _ = world
    user = member(acme)
    _key, plaintext = api_key(user, team=acme)
    assert chat(plaintext).status_code == 200
    TeamMembership.objects.filter(user=user).delete()  # broadcast: every process hears
    assert chat(plaintext).json()["error"]["code"] == "team_not_allowed"
    assert chat(access_token(user), org="acme").status_code == 403
    assert chat(access_token(user)).status_code == 200  # alone, on their own budget


def test_a_team_budget_refuses_with_its_name_and_the_team_tiers_upgrade(world):
    _, acme, _ = world
    acme.tokens_per_month = 50
    acme.save()
    first, second = member(acme), member(acme)
    assert chat(access_token(first), max_tokens=5).status_code == 200
    refused = chat(access_token(second), max_tokens=100)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "insufficient_quota" and "team.tokens_per_month" in error["message"]
    assert refused.json()["error"]["upgrade"] == {
        "tier": "enterprise",
        "url": "https://example.com/up",
    }
    assert refused["x-should-retry"] == "false"


def test_a_refusal_by_the_teams_per_request_cap_names_the_team(world):
    _, acme, _ = world
    acme.max_tokens_per_request = 20
    acme.save()
    refused = chat(access_token(member(acme)), max_tokens=500)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "insufficient_quota"
    assert "team.max_tokens_per_request" in error["message"]
    assert error["upgrade"] == {"tier": "enterprise", "url": "https://example.com/up"}


def test_a_blocked_team_is_refused_before_redis(world):
    _, acme, _ = world
    acme.blocked = True
    acme.save()
    refused = chat(access_token(member(acme)))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "team_blocked"


def test_the_team_endpoints(world):
    _, acme, globex = world
    admin, plain = member(acme, role="admin"), member(acme)
    member(globex, user=plain)
    assert chat(access_token(admin)).status_code == 200
    assert chat(access_token(plain), org="acme").status_code == 200
    teams = Client().get(
        "/api/llm-quota/teams/", HTTP_AUTHORIZATION=f"Bearer {access_token(plain)}"
    )
    assert [(t["slug"], t["role"]) for t in teams.json()] == [
        ("acme", "member"),
        ("globex", "member"),
    ]
    usage = Client().get(
        "/api/llm-quota/teams/acme/usage/", HTTP_AUTHORIZATION=f"Bearer {access_token(admin)}"
    )
    assert usage.status_code == 200, usage.content
    body = usage.json()
    assert body["tier"] == "team" and body["usage"]["tokens_this_month"] == team_tokens(acme)
    members = {m["user"]["username"]: m["requests"] for m in body["by_member"]}
    assert members == {admin.username: 1, plain.username: 1}
    assert body["by_model"][0]["model"] == "gpt-4o"
    assert body["upgrade"]["tier"] == "enterprise"
    denied = Client().get(
        "/api/llm-quota/teams/acme/usage/", HTTP_AUTHORIZATION=f"Bearer {access_token(plain)}"
    )
    assert denied.status_code == 403
    hidden = Client().get(
        "/api/llm-quota/teams/globex/usage/", HTTP_AUTHORIZATION=f"Bearer {access_token(admin)}"
    )
    assert hidden.status_code == 404


def test_a_warm_request_with_a_keys_team_makes_no_sql_query(world, django_assert_num_queries):
    from llm_quota.ledger.config_broadcast import listener

    _, acme, _ = world
    _key, plaintext = api_key(member(acme), team=acme)
    assert chat(plaintext).status_code == 200
    assert listener.subscribed.wait(5)
    assert chat(plaintext).status_code == 200
    with django_assert_num_queries(0):
        assert chat(plaintext).status_code == 200


@pytest.mark.urls("tests.integration.pipeline_urls")
@pytest.mark.parametrize("path", ["/drf/settle", "/plain"])
def test_the_throttle_and_quota_gated_choose_the_team_alike(world, path):
    _, acme, globex = world
    user = member(globex, user=member(acme))
    headers = {"HTTP_AUTHORIZATION": f"Bearer {access_token(user)}"}
    post = Client().post
    assert post(path, json.dumps(BODY), content_type="application/json",
                HTTP_OPENAI_ORGANIZATION="acme", **headers).status_code == 200  # fmt: skip
    assert team_tokens(acme) > 0 and team_tokens(globex) == 0
    refused = post(path, json.dumps(BODY), content_type="application/json",
                   HTTP_OPENAI_ORGANIZATION="initech", **headers)  # fmt: skip
    assert refused.status_code == 403


def test_quota_guard_takes_a_team_by_slug_or_instance(world):
    from llm_quota import quota_guard
    from llm_quota.exceptions import TeamNotAllowed

    _, acme, globex = world
    user = member(globex, user=member(acme))
    for team in ("acme", acme):
        with quota_guard(user, model="gpt-4o", prompt_tokens=10, max_tokens=5, team=team) as q:
            q.settle({"prompt_tokens": 10, "completion_tokens": 5})
    assert get_ledger().team_usage(acme.pk).by_member[0].requests == 2
    with pytest.raises(TeamNotAllowed):
        quota_guard(factories.user(), model="gpt-4o", prompt_tokens=10, team="acme").admit()


def test_the_admin_lists_teams_with_live_usage_and_edits_members_inline(world, admin_client):
    from django.urls import reverse

    _, acme, _ = world
    user = member(acme)
    assert chat(access_token(user)).status_code == 200
    listing = admin_client.get(reverse("admin:llm_quota_team_changelist")).content.decode()
    assert "acme" in listing and f"{team_tokens(acme):,}" in listing
    page = admin_client.get(reverse("admin:llm_quota_team_change", args=[acme.pk]))
    html = page.content.decode()
    assert page.status_code == 200 and user.username in html and "1 requests" in html
    newcomer = factories.user()
    saved = admin_client.post(
        reverse("admin:llm_quota_team_change", args=[acme.pk]),
        {"slug": "acme", "name": "Acme", "tier": acme.tier_id, "requests_per_minute": "",
         "max_concurrent_requests": "", "tokens_per_day": "", "tokens_per_month": "",
         "max_tokens_per_request": "",
         "memberships-TOTAL_FORMS": "2", "memberships-INITIAL_FORMS": "1",
         "memberships-0-id": acme.memberships.get().pk, "memberships-0-team": acme.pk,
         "memberships-0-user": user.pk, "memberships-0-role": "member",
         "memberships-1-team": acme.pk, "memberships-1-user": newcomer.pk,
         "memberships-1-role": "admin"},
    )  # fmt: skip
    assert saved.status_code == 302, saved.content.decode()[:2000]
    assert chat(access_token(newcomer)).status_code == 200  # the new member's only team pays
    assert get_ledger().team_usage(acme.pk).by_member[-1].requests == 1


def test_crossing_the_team_soft_limit_alerts_its_admins_once(world):
    from llm_quota import quota_guard
    from llm_quota.signals import team_soft_limit_crossed

    _, acme, _ = world
    acme.tokens_per_month = 1000  # soft limit: 80% of it, 800
    acme.save()
    boss, worker = member(acme, role="admin"), member(acme)
    seen = []

    def receiver(**kwargs):
        seen.append(kwargs)

    team_soft_limit_crossed.connect(receiver, weak=False, dispatch_uid="team-alert-test")
    try:
        for _ in range(5):  # 5 x 200 = 1000: the 4th settle crosses 800
            with quota_guard(worker, model="gpt-4o", prompt_tokens=100, max_tokens=25) as q:
                q.settle({"prompt_tokens": 100, "completion_tokens": 25})
    finally:
        team_soft_limit_crossed.disconnect(dispatch_uid="team-alert-test")
    assert len(seen) == 1
    alert = seen[0]
    assert (alert["team"], alert["limit"], alert["threshold"], alert["used"]) == (
        "acme", "team.tokens_per_month", 800, 800,
    )  # fmt: skip
    assert alert["admins"] == [str(boss.pk)]


def test_the_team_page_charts_its_monthly_usage_by_member_from_the_snapshots(world, admin_client):
    _, acme, _ = world
    alice, bob = member(acme), member(acme)
    this = datetime.now(UTC).date().replace(day=1)
    before = add_months(this, -1)
    TeamUsageSnapshot.objects.create(
        team=acme, period=before, base_tokens=700,
        by_member={str(alice.pk): {"base_tokens": 500}, str(bob.pk): {"base_tokens": 200}},
    )  # fmt: skip
    TeamUsageSnapshot.objects.create(
        team=acme, period=this, base_tokens=300, by_member={str(bob.pk): {"base_tokens": 300}}
    )
    page = admin_client.get(reverse("admin:llm_quota_team_change", args=[acme.pk]))
    text = page.content.decode()
    assert page.status_code == 200 and text.count('<svg class="llmq-chart"') == 1
    assert f"{before:%b %Y} · {alice.username}: 500" in text
    assert f"{this:%b %Y} · {bob.username}: 300" in text


def test_a_team_budget_refusal_alerts_its_admins_once_per_period(world):
    """The team's month budget refusing a member sends ``team_budget_exhausted`` to the
    team's admins once, however many members are refused after it."""
    from llm_quota.quota.alerts import sent
    from llm_quota.signals import budget_exhausted, team_budget_exhausted

    _, acme, _ = world
    acme.tokens_per_month = 10
    acme.save()
    boss, worker = member(acme, role="admin"), member(acme)
    seen, personal = [], []

    def receiver(**kwargs):
        seen.append(kwargs)

    def user_receiver(**kwargs):
        personal.append(kwargs)

    team_budget_exhausted.connect(receiver, weak=False, dispatch_uid="team-budget-test")
    budget_exhausted.connect(user_receiver, weak=False, dispatch_uid="team-budget-user")
    try:
        for bearer in (access_token(worker), access_token(boss), access_token(worker)):
            refused = chat(bearer, max_tokens=100)
            assert refused.status_code == 429
            assert "team.tokens_per_month" in refused.content.decode()
    finally:
        team_budget_exhausted.disconnect(dispatch_uid="team-budget-test")
        budget_exhausted.disconnect(dispatch_uid="team-budget-user")
        sent.clear()
    assert len(seen) == 1 and personal == []  # the team's budget, not the members'
    alert = seen[0]
    assert (alert["team"], alert["limit"], alert["percent"], alert["admins"]) == (
        "acme", "team.tokens_per_month", 100, [str(boss.pk)],
    )  # fmt: skip
    assert alert["event"]["event"] == "team_budget_exhausted" and alert["retry_after"] >= 1
