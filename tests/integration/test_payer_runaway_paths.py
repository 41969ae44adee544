"""A key's and a team's burn-rate breaker end to end (contract §11, issue 15): a trip
through the gateway is 429 ``key.``/``team.burn_rate_exceeded``, signalled, logged and
posted naming the payer, leaves the user's other traffic alone, and staff resume the
key or the team through the API."""

from __future__ import annotations

import logging

import pytest
from django.test import Client

from llm_quota.models import Team, TeamMembership
from llm_quota.quota import alerts, runaway
from llm_quota.rules.accounting import ActualUsage, Limits
from tests.integration import test_runaway_paths as paths
from tests.support import factories
from tests.support.api_keys import api_key
from tests.support.factories import estimate
from tests.support.gateway import access_token

pytestmark = pytest.mark.django_db(transaction=True)

# The user-breaker tests' fixtures and helpers: a hair-trigger tier, the trips seen.
hair_trigger, trips, gateway = paths.hair_trigger, paths.trips, paths.gateway


def busy_history(ledger, clock, user):
    """Two busy 5-minute buckets of the user's own: a baseline of 4,000 base tokens a
    minute, so only a key's own (new) baseline is low enough to trip."""
    for _ in range(2):
        for _ in range(10):
            d = ledger.reserve(user.pk, Limits(), estimate(400, 0), clamp=False)
            ledger.settle(d.reservation, ActualUsage(400, 0))
        clock.advance(300)


def staff_client():
    client = Client()
    client.force_login(paths._staff())
    return client


def test_a_runaway_key_is_paused_named_and_resumed_while_its_user_goes_on(
    hair_trigger, ledger, clock, trips, caplog, monkeypatch
):
    posted = []
    monkeypatch.setattr(alerts, "deliver_webhook", posted.append)
    user = factories.user()
    busy_history(ledger, clock, user)
    key, plaintext = api_key(user)
    with caplog.at_level(logging.CRITICAL, logger="llm_quota"):
        assert gateway(plaintext).status_code == 200
        refused = gateway(plaintext)
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false" and refused.headers["Retry-After"] == "900"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "burn_rate_exceeded")
    assert error["limit"] == "key.burn_rate_exceeded"
    assert [(t["user_id"], t["api_key_id"], t["limit"]) for t in trips] == [
        (str(user.pk), str(key.pk), "key.burn_rate_exceeded")
    ]
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and f"api_key_id {key.pk}" in critical[0]
    assert posted[0]["api_key_id"] == str(key.pk) and posted[0]["limit"] == "key.burn_rate_exceeded"
    assert runaway.paused_user_ids(ledger) == []  # the key is paused, not its user
    assert gateway(access_token(user)).status_code == 200  # the user's own traffic
    url = f"/api/llm-quota/keys/{key.pk}/resume/"
    as_user = Client(headers={"Authorization": f"Bearer {access_token(user)}"})
    assert as_user.post(url).status_code == 403  # staff only
    staff = staff_client()
    response = staff.post(url)
    assert response.status_code == 200
    assert response.json() == {
        "api_key": str(key.pk),
        "user": {"id": str(user.pk), "username": user.get_username()},
        "was_paused": True,
    }
    assert gateway(plaintext).status_code == 200
    assert staff.post("/api/llm-quota/keys/999999/resume/").status_code == 404


def test_members_together_pause_their_team_and_staff_resume_it(ledger, trips, monkeypatch):
    posted = []
    monkeypatch.setattr(alerts, "deliver_webhook", posted.append)
    factories.price("gpt-4o", "1", "4")
    factories.tier("plain", is_default=True, burn_multiplier=None)  # members: no breaker
    team_tier = factories.tier("team", burn_multiplier=10, burn_floor=10, burn_pause_seconds=900)
    team = Team.objects.create(slug="acme", name="Acme", tier=team_tier)
    one, two = factories.user(), factories.user()
    for user in (one, two):
        TeamMembership.objects.create(team=team, user=user, role="member")
    assert gateway(access_token(one)).status_code == 200
    refused = gateway(access_token(two))  # the team's minute holds the first call
    assert refused.status_code == 429
    assert refused.json()["error"]["limit"] == "team.burn_rate_exceeded"
    assert refused.json()["error"]["code"] == "burn_rate_exceeded"
    assert [(t["user_id"], t["team"]) for t in trips] == [(str(two.pk), str(team.pk))]
    assert posted[0]["team"] == str(team.pk)
    assert gateway(access_token(one)).status_code == 429  # every member: the team is paused
    staff = staff_client()
    response = staff.post("/api/llm-quota/teams/acme/resume/")
    assert response.json() == {"team": "acme", "was_paused": True}
    assert gateway(access_token(one)).status_code == 200
    assert staff.post("/api/llm-quota/teams/nobody/resume/").status_code == 404


def admin_client():
    client = Client()
    client.force_login(paths._staff(superuser=True))
    return client


def resume_in_the_admin(client, changelist, selected, expected_note):
    """The "paused" filter's rows, then the "Resume" action on ``selected``."""
    shown = [row.pk for row in client.get(f"{changelist}?paused=yes").context["cl"].result_list]
    response = client.post(
        changelist, {"action": "resume_paused", "_selected_action": selected}, follow=True
    )
    assert [str(m) for m in response.context["messages"]] == [expected_note]
    after = client.get(f"{changelist}?paused=yes").context["cl"].result_list
    return shown, list(after)


def test_the_admin_filters_paused_keys_and_resumes_them(hair_trigger, ledger, clock):
    user = factories.user()
    busy_history(ledger, clock, user)
    key, plaintext = api_key(user)
    calm, _ = api_key(user)
    gateway(plaintext)
    assert gateway(plaintext).status_code == 429
    assert runaway.paused_ids(ledger, "key") == [str(key.pk)]
    shown, after = resume_in_the_admin(
        admin_client(), "/admin/llm_quota/apikey/", [key.pk, calm.pk],
        "Resumed 1 paused API key(s) of 2.",
    )  # fmt: skip
    assert (shown, after) == ([key.pk], [])
    assert not ledger.key_burn_state(user.pk, key.pk).paused
    assert gateway(plaintext).status_code == 200


def test_the_admin_filters_paused_teams_and_resumes_them(ledger, trips):
    factories.price("gpt-4o", "1", "4")
    factories.tier("plain", is_default=True, burn_multiplier=None)
    team_tier = factories.tier("team", burn_multiplier=10, burn_floor=10, burn_pause_seconds=900)
    team = Team.objects.create(slug="acme", name="Acme", tier=team_tier)
    calm = Team.objects.create(slug="calm", name="Calm", tier=team_tier)
    one, two = factories.user(), factories.user()
    for user in (one, two):
        TeamMembership.objects.create(team=team, user=user, role="member")
    gateway(access_token(one))
    assert gateway(access_token(two)).status_code == 429
    assert runaway.paused_ids(ledger, "team") == [str(team.pk)]
    shown, after = resume_in_the_admin(
        admin_client(), "/admin/llm_quota/team/", [team.pk, calm.pk],
        "Resumed 1 paused team(s) of 2.",
    )  # fmt: skip
    assert (shown, after) == ([team.pk], [])
    assert runaway.paused_ids(ledger, "team") == []
    assert gateway(access_token(one)).status_code == 200
