"""A blocked user is told so: 403 ``user_blocked`` on every path, never the
``insufficient_scope`` that blocking's emptied scopes would otherwise give, and before
any Redis command."""

from __future__ import annotations

import json

import pytest
from django.test import AsyncClient, Client, override_settings

from llm_quota.models import UserQuota
from tests.support import factories
from tests.support.gateway import MSGS, access_token
from tests.system.test_async_ledger import run_with_orm

pytestmark = pytest.mark.django_db(transaction=True)

BODY = json.dumps({"model": "gpt-4o", "messages": MSGS, "max_tokens": 20})
PIPELINE = "tests.integration.pipeline_urls"
ASYNC = "tests.integration.gateway.async_gateway_urls"


@pytest.fixture
def blocked(ledger):
    factories.price("gpt-4o", "1", "4")
    tier = factories.tier("free", is_default=True, requests_per_minute=50)
    user = factories.user(tier)
    token = access_token(user)  # issued while allowed: it still says llm:chat
    quota = UserQuota.objects.get(user=user)
    quota.blocked = True
    quota.save()  # as the admin saves it: every process sees it
    return user, token


def sync_post(urls: str, path: str, token: str | None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with override_settings(ROOT_URLCONF=urls):
        return Client().post(path, BODY, content_type="application/json", headers=headers)


def async_post(path: str, token: str):
    headers = {"Authorization": f"Bearer {token}"}

    async def main():
        post = AsyncClient().post
        return await post(path, BODY, content_type="application/json", headers=headers)

    with override_settings(ROOT_URLCONF=ASYNC):
        return run_with_orm(main)


def test_a_blocked_user_is_403_user_blocked_on_every_path_before_redis(
    blocked, ledger, redis_client
):
    user, token = blocked
    openai_shaped = {
        "sync gateway": sync_post("project.urls", "/v1/chat/completions", token),
        "async gateway": async_post("/v1/chat/completions", token),
        "@quota_gated": sync_post(PIPELINE, "/plain", token),
        "async @quota_gated": async_post("/aplain", token),
    }
    for name, response in openai_shaped.items():
        assert response.status_code == 403, name
        assert response.json()["error"]["code"] == "user_blocked", (name, response.json())
    # A DRF view (HasScope's permission, the throttle): DRF's own {"detail"} body.
    throttled = sync_post(PIPELINE, "/drf/settle", token)
    assert throttled.status_code == 403
    assert "blocked" in throttled.json()["detail"], throttled.json()
    usage = Client(headers={"Authorization": f"Bearer {token}"}).get("/api/llm-quota/usage/")
    assert usage.status_code == 403 and "blocked" in usage.json()["detail"], usage.json()
    assert not list(redis_client.scan_iter(match=f"{ledger.keyspace.prefix}:*"))
