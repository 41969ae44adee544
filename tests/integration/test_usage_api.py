"""The usage API: shape, exact numbers, and who may see what."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rest_framework.test import APIClient

from llm_quota import quota_guard
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories, periods
from tests.support.spend import spend

pytestmark = pytest.mark.django_db


@pytest.fixture
def tiers(ledger):
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=100)
    factories.price("gpt-4o-mini", "0.06", "0.24", default_max_output_tokens=100)
    pro = factories.tier("pro", tokens_per_month=10**7)
    free = factories.tier(
        "free",
        requests_per_minute=10,
        tokens_per_minute=20_000,
        tokens_per_day=50_000,
        tokens_per_month=500_000,
        max_concurrent_requests=2,
        is_default=True,
        upgrade_to=pro,
        upgrade_url="https://example.com/upgrade",
    )
    return free, pro


def client_for(user):
    client = APIClient()
    response = client.post("/api/token/", {"username": user.username, "password": "pw-123456"})
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {response.json()['access']}")
    return client


def test_usage_reports_the_contract_shape_with_the_settled_numbers(tiers, ledger, clock):
    user = factories.user()
    spend(user, 100, 50)  # 100 + 200 = 300
    spend(user, 20, 10)  # 20 + 40 = 60
    spend(user, 1000, 100, model="gpt-4o-mini")  # ceil(60 + 24) = 84
    in_flight = quota_guard(user, model="gpt-4o", prompt_tokens=10, max_tokens=5).__enter__()

    body = client_for(user).get("/api/llm-quota/usage/").json()

    assert body == {
        "tier": "free",
        "period": {
            "start": f"{periods.month_start(clock)}T00:00:00Z",
            "end": f"{periods.next_month_start(clock)}T00:00:00Z",
        },
        "limits": {
            "requests_per_minute": 10,
            "tokens_per_minute": 20_000,
            "tokens_per_day": 50_000,
            "tokens_per_month": 500_000,
            "max_concurrent_requests": 2,
            "max_tokens_per_request": None,
        },
        "usage": {
            "tokens_today": 444 + 30,
            "tokens_this_month": 444 + 30,
            "reserved": 30,  # the call in flight: 10 + 5 x 4
            "requests_this_minute": 4,
        },
        "remaining": {
            "requests_per_minute": 6,
            "tokens_per_minute": 20_000 - 474,
            "tokens_per_day": 50_000 - 474,
            "tokens_per_month": 500_000 - 474,
            "max_concurrent_requests": 1,
        },
        "by_model": [
            {
                "model": "gpt-4o",
                "requests": 2,
                "input_tokens": 120,
                "output_tokens": 60,
                "base_tokens": 360,
            },
            {
                "model": "gpt-4o-mini",
                "requests": 1,
                "input_tokens": 1000,
                "output_tokens": 100,
                "base_tokens": 84,
            },
        ],  # fmt: skip
        "cost_usd": "0.001110",  # 444 settled base tokens at $2.50 per million
        "upgrade": {"tier": "pro", "url": "https://example.com/upgrade"},
    }
    in_flight.release()


def test_usage_needs_a_token_and_the_usage_scope(tiers):
    free, _ = tiers
    user = factories.user()
    assert APIClient().get("/api/llm-quota/usage/").status_code == 401
    free.scopes = "llm:chat"
    free.save()
    response = client_for(user).get("/api/llm-quota/usage/")
    assert response.status_code == 403 and response.json()["detail"]
    assert "usage:read" in response.json()["detail"]


def test_history_lists_only_the_callers_snapshots_paginated(tiers, ledger, clock):
    alice, bob = factories.user(), factories.user()
    spend(alice, 100, 50)
    spend(alice, 1000, 100, model="gpt-4o-mini")
    spend(bob, 7, 3)
    snapshot_usage(ledger=ledger)

    client = client_for(alice)
    page = client.get("/api/llm-quota/usage/history/?page_size=1").json()
    assert page["count"] == 2 and page["next"] and len(page["results"]) == 1
    everything = client.get(f"/api/llm-quota/usage/history/?user={bob.pk}").json()["results"]
    assert [(r["model"], r["base_tokens"]) for r in everything] == [
        ("gpt-4o", 300),
        ("gpt-4o-mini", 84),
    ]
    assert everything[0]["period"] == str(periods.month_start(clock))
    assert everything[0]["cost_usd"] == "0.000750"
    assert set(everything[0]) == {
        "period", "model", "requests", "input_tokens", "output_tokens", "base_tokens",
        "cost_usd", "updated_at",
    }  # fmt: skip


def test_another_users_usage_is_unreachable_to_a_non_staff_user(tiers, ledger):
    alice, bob = factories.user(), factories.user()
    spend(bob, 100, 50)
    client = client_for(alice)
    for url in (f"/api/llm-quota/users/{bob.pk}/usage/", f"/api/llm-quota/users/{alice.pk}/usage/"):
        assert client.get(url).status_code == 403
    # Nothing else takes a user id: alice's own report shows none of bob's usage.
    assert client.get(f"/api/llm-quota/usage/?user={bob.pk}").json()["by_model"] == []


def test_staff_read_any_users_usage_with_the_same_numbers(tiers, ledger):
    bob = factories.user()
    spend(bob, 100, 50)
    staff = factories.user()
    staff.is_staff = True
    staff.save()
    client = client_for(staff)

    body = client.get(f"/api/llm-quota/users/{bob.pk}/usage/").json()

    assert body["user"] == {"id": str(bob.pk), "username": bob.username}
    assert body["usage"]["tokens_this_month"] == 300
    assert body["by_model"][0]["base_tokens"] == 300
    assert client.get("/api/llm-quota/users/999999/usage/").status_code == 404
    assert client.get("/api/llm-quota/users/not-a-number/usage/").status_code == 404


def test_tiers_are_listed_for_any_signed_in_user(tiers):
    user = factories.user()
    assert APIClient().get("/api/llm-quota/tiers/").status_code == 401
    body = client_for(user).get("/api/llm-quota/tiers/").json()
    assert [t["name"] for t in body] == ["free", "pro"]
    free = body[0]
    assert free["tokens_per_month"] == 500_000 and free["upgrade_to"] == "pro"
    assert free["scopes"] == ["llm:chat", "usage:read"] and free["allowed_models"] == []
    assert free["is_default"] is True and free["soft_limit_percent"] == 80


def test_redis_down_is_a_503_not_a_500(tiers, quota_prefix):
    user = factories.user()
    client = client_for(user)
    down = redis.Redis(port=9, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    set_default_ledger(Ledger(down, prefix=quota_prefix))
    response = client.get("/api/llm-quota/usage/")
    assert response.status_code == 503 and "detail" in response.json()


def test_openapi_schema_documents_the_usage_api():
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    body = schema.json()
    for path in (
        "/api/llm-quota/usage/",
        "/api/llm-quota/usage/history/",
        "/api/llm-quota/users/{user_id}/usage/",
        "/api/llm-quota/tiers/",
    ):
        assert path in body["paths"]
    report = body["components"]["schemas"]["UsageReport"]["properties"]
    assert set(report) == {
        "tier", "period", "limits", "usage", "remaining", "by_model", "cost_usd", "upgrade",
    }  # fmt: skip
