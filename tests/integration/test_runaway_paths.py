"""The burn-rate breaker through every path (contract §11): a trip is 429
``insufficient_quota``/``burn_rate_exceeded`` with ``x-should-retry: false`` and the
rest of the pause as ``Retry-After``; it is signalled, logged and listed as paused
once; staff resume the caller from the admin or the API."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from llm_quota.quota import alerts, runaway
from llm_quota.rules.accounting import ActualUsage, Limits
from llm_quota.signals import burn_rate_tripped
from tests.integration.test_blocked_users import PIPELINE, async_post, sync_post
from tests.support import factories
from tests.support.factories import estimate
from tests.support.gateway import access_token

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hair_trigger(ledger):
    """A tier whose breaker trips on a new user's second call: the first one's estimate
    (settled: 17 base tokens or more) is in the minute before it."""
    factories.price("gpt-4o", "1", "4")
    return factories.tier(
        "hair", is_default=True, burn_multiplier=10, burn_floor=10, burn_pause_seconds=900
    )


def gateway(token):
    return sync_post("project.urls", "/v1/chat/completions", token)


def trip(token):
    """Two calls through the gateway: the second trips the hair trigger."""
    assert gateway(token).status_code == 200
    assert gateway(token).json()["error"]["code"] == "burn_rate_exceeded"


@pytest.fixture
def trips():
    seen = []

    def receiver(sender, **kwargs):
        seen.append(kwargs)

    burn_rate_tripped.connect(receiver)
    yield seen
    burn_rate_tripped.disconnect(receiver)


def test_a_trip_is_refused_as_burn_rate_exceeded_on_every_path(hair_trigger, clock, trips):
    paths = {
        "sync gateway": lambda t: sync_post("project.urls", "/v1/chat/completions", t),
        "async gateway": lambda t: async_post("/v1/chat/completions", t),
        "@quota_gated": lambda t: sync_post(PIPELINE, "/plain", t),
        "async @quota_gated": lambda t: async_post("/aplain", t),
        "throttle": lambda t: sync_post(PIPELINE, "/drf/settle", t),
        "guard": lambda t: sync_post(PIPELINE, "/drf/guarded", t),
    }
    for name, post in paths.items():
        user = factories.user()
        token = access_token(user)
        assert post(token).status_code == 200, name
        tripped = post(token)
        clock.advance(100)
        paused = post(token)  # still paused: the rest of the pause
        for response, wait in ((tripped, 900), (paused, 800)):
            assert response.status_code == 429, (name, response.content)
            assert response["x-should-retry"] == "false", name
            assert response["Retry-After"] == str(wait), name
            body = response.json()
            if "error" in body:  # the OpenAI shape
                error = body["error"]
                assert (error["type"], error["code"]) == (
                    "insufficient_quota", "burn_rate_exceeded",
                ), name  # fmt: skip
                assert error["limit"] == "burn_rate_exceeded"
            else:  # DRF's {"detail"} shape (the throttle, the guard in a DRF view)
                assert body["limit"] == "burn_rate_exceeded", name
                assert "paused" in body["detail"], name
    assert len(trips) == len(paths)  # once per trip, not per refusal


def test_a_trip_is_signalled_logged_listed_and_posted_once(
    hair_trigger, ledger, trips, caplog, settings, monkeypatch
):
    posted = []
    monkeypatch.setattr(alerts, "deliver_webhook", posted.append)
    user = factories.user()
    token = access_token(user)
    with caplog.at_level(logging.CRITICAL, logger="llm_quota"):
        assert gateway(token).status_code == 200
        for _ in range(3):
            assert gateway(token).status_code == 429
    assert [(t["user_id"], t["paused_seconds"], t["tier"]) for t in trips] == [
        (str(user.pk), 900, "hair")
    ]
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "burn-rate breaker tripped" in critical[0].getMessage()
    assert len(posted) == 1
    assert posted[0]["event"] == "burn_rate_tripped"
    assert posted[0]["user_id"] == str(user.pk) and posted[0]["paused_seconds"] == 900
    assert runaway.paused_user_ids(ledger) == [str(user.pk)]


def test_staff_resume_through_the_api(hair_trigger, ledger):
    user = factories.user()
    token = access_token(user)
    trip(token)
    url = f"/api/llm-quota/users/{user.pk}/resume/"
    # Not for the user themself: staff only, and refused before any Redis command.
    assert Client(headers={"Authorization": f"Bearer {token}"}).post(url).status_code == 403
    staff = _staff()
    client = Client()
    client.force_login(staff)
    response = client.post(url)
    assert response.status_code == 200
    assert response.json() == {
        "user": {"id": str(user.pk), "username": user.get_username()},
        "was_paused": True,
    }
    assert ledger.burn_state(user.pk).paused is False
    assert runaway.paused_user_ids(ledger) == []
    assert sync_post(PIPELINE, "/plain", token).status_code == 200
    assert client.post(url).json()["was_paused"] is False
    assert client.post("/api/llm-quota/users/nobody/resume/").status_code == 404


def test_the_admin_filters_paused_users_and_resumes_them(hair_trigger, ledger):
    paused, calm = factories.user(), factories.user()
    trip(access_token(paused))
    client = Client()
    client.force_login(_staff(superuser=True))
    listing = client.get("/admin/llm_quota/quotauser/?paused=yes")
    assert listing.status_code == 200
    shown = [u.pk for u in listing.context["cl"].result_list]
    assert shown == [paused.pk] and calm.pk not in shown
    response = client.post(
        "/admin/llm_quota/quotauser/",
        {"action": "resume_paused", "_selected_action": [paused.pk, calm.pk]},
        follow=True,
    )
    notes = [str(m) for m in response.context["messages"]]
    assert notes == ["Resumed 1 paused user(s) of 2."], notes
    assert not ledger.burn_state(paused.pk).paused
    assert (
        list(client.get("/admin/llm_quota/quotauser/?paused=yes").context["cl"].result_list) == []
    )


def _staff(superuser: bool = False):
    User = get_user_model()
    name = "boss" if superuser else "staff"
    if superuser:
        return User.objects.create_superuser(name, f"{name}@example.com", "pw")
    return User.objects.create_user(name, password="pw", is_staff=True)


def test_the_users_page_shows_the_pause_and_the_rate_against_the_baseline(hair_trigger):
    user = factories.user()
    trip(access_token(user))
    client = Client()
    client.force_login(_staff(superuser=True))
    page = client.get(f"/admin/llm_quota/quotauser/{user.pk}/change/").content.decode()
    assert "Runaway protection" in page and "<strong>Paused</strong> for 15 minutes" in page
    assert '<svg class="llmq-chart"' in page and "Trips above" in page


def test_a_slow_tier_past_its_soft_limit_answers_rate_limits_not_budget_refusals(ledger, clock):
    factories.price("gpt-4o", "1", "4")
    slow = factories.tier("slow", requests_per_minute=60, tokens_per_month=100_000,
                          soft_limit_percent=50, soft_limit_mode="slow")  # fmt: skip
    for path in ("/plain", "/drf/settle"):
        user = factories.user(slow)
        spent = ledger.reserve(user.pk, Limits(), estimate(99_000, 0))
        ledger.settle(spent.reservation, ActualUsage(99_000, 0))  # 1% of the budget left
        clock.advance(61)  # that call has left the request window
        token = access_token(user)
        first = sync_post(PIPELINE, path, token)
        assert first.status_code == 200, (path, first.content)
        assert first["x-ratelimit-limit-requests"] == "1", path  # 60 shrunk to 1 a minute
        second = sync_post(PIPELINE, path, token)
        assert second.status_code == 429, path
        assert "x-should-retry" not in second and 1 <= int(second["Retry-After"]) <= 60
        body = second.json()
        limit = body["error"]["limit"] if "error" in body else body["limit"]
        assert limit == "requests_per_minute", path
