"""API keys end to end on the test client: the key endpoints, ApiKeyAuthentication on
the gateway and the usage API, scopes within the tier, expiry and revocation, key
limits named in refusals, and no SQL on a warm request (real Redis)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from llm_quota.models import ApiKey, hash_api_key
from tests.support import factories
from tests.support.api_keys import api_key
from tests.support.gateway import access_token

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def member(quota_prefix):
    factories.price("gpt-4o", "1", "4")
    tier = factories.tier("free", is_default=True, requests_per_minute=100,
                          tokens_per_month=10**6)  # fmt: skip
    return factories.user(tier)


def _chat(bearer: str, **extra):
    response = Client().post(
        "/v1/chat/completions", json.dumps({**BODY, **extra}), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {bearer}",
    )  # fmt: skip
    if response.streaming:
        b"".join(response.streaming_content)
    return response


def _api(method: str, path: str, bearer: str, data=None):
    client = Client()
    call = getattr(client, method)
    kwargs = {"HTTP_AUTHORIZATION": f"Bearer {bearer}"}
    if data is not None:
        return call(path, json.dumps(data), content_type="application/json", **kwargs)
    return call(path, **kwargs)


def test_a_key_is_shown_once_and_only_its_hash_is_stored(member):
    created = _api("post", "/api/llm-quota/keys/", access_token(member),
                   {"name": "ci", "tokens_per_day": 5000})  # fmt: skip
    assert created.status_code == 201, created.content
    body = created.json()
    key = body["key"]
    assert key.startswith("llmq_") and len(key) >= 5 + 43  # 32 random bytes, base64
    assert key.startswith(body["prefix"]) and body["team"] is None
    row = ApiKey.objects.get(pk=body["id"])
    assert row.key_hash == hash_api_key(key) and key not in row.key_hash
    listed = _api("get", "/api/llm-quota/keys/", access_token(member)).json()
    assert [k["prefix"] for k in listed] == [body["prefix"]]
    assert "key" not in listed[0] and "key_hash" not in listed[0]
    assert listed[0]["tokens_per_day"] == 5000


def test_a_key_cannot_mint_or_revoke_keys(member):
    key, plaintext = api_key(member)
    assert _api("post", "/api/llm-quota/keys/", plaintext, {"name": "x"}).status_code == 403
    assert _api("get", "/api/llm-quota/keys/", plaintext).status_code == 403
    assert _api("delete", f"/api/llm-quota/keys/{key.pk}/", plaintext).status_code == 403
    assert ApiKey.objects.count() == 1


def test_a_key_cannot_ask_for_scopes_beyond_its_tier(member):
    refused = _api("post", "/api/llm-quota/keys/", access_token(member),
                   {"name": "x", "scopes": "llm:chat admin:all"})  # fmt: skip
    assert refused.status_code == 400 and "admin:all" in refused.json()["scopes"][0]
    assert not ApiKey.objects.exists()


def test_the_gateway_and_the_usage_api_accept_a_key(member):
    _key, plaintext = api_key(member)
    assert _chat(plaintext).status_code == 200
    usage = _api("get", "/api/llm-quota/usage/", plaintext)
    assert usage.status_code == 200 and usage.json()["usage"]["tokens_this_month"] > 0


def test_a_key_with_only_the_usage_scope_cannot_chat(member):
    _key, plaintext = api_key(member, scopes="usage:read")
    refused = _chat(plaintext)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_scope"
    assert _api("get", "/api/llm-quota/usage/", plaintext).status_code == 200


def test_a_key_scope_the_tier_no_longer_grants_is_not_held(member):
    _key, plaintext = api_key(member, scopes="llm:chat usage:read")
    tier = member.llm_quota.tier
    tier.scopes = "usage:read"
    tier.save()
    assert _chat(plaintext).json()["error"]["code"] == "insufficient_scope"


@pytest.mark.parametrize("bad", ["llmq_nosuchkeynosuchkeynosuchkeynosuchkeynosuch", "llmq_"])
def test_an_unknown_key_gets_401_invalid_api_key(member, bad):
    refused = _chat(bad)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused["WWW-Authenticate"].startswith("Bearer")


def test_a_right_prefix_with_a_wrong_secret_is_refused(member):
    _key, plaintext = api_key(member)
    forged = plaintext[:-4] + ("AAAA" if not plaintext.endswith("AAAA") else "BBBB")
    assert _chat(forged).status_code == 401


def test_an_expired_key_gets_401(member):
    _key, plaintext = api_key(member, expires_at=timezone.now() + timedelta(hours=1))
    assert _chat(plaintext).status_code == 200
    ApiKey.objects.update(expires_at=timezone.now() - timedelta(seconds=1))  # no signal
    from llm_quota.rules.config_cache import config_cache

    config_cache.invalidate()
    refused = _chat(plaintext)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert "expired" in refused.json()["error"]["message"]


def test_a_revoked_key_is_refused_on_its_next_request(member):
    key, plaintext = api_key(member)
    assert _chat(plaintext).status_code == 200  # warm: the key is cached now
    assert _api("delete", f"/api/llm-quota/keys/{key.pk}/", access_token(member)).status_code == 204
    refused = _chat(plaintext)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]


def test_another_users_key_cannot_be_revoked_or_read(member):
    key, _ = api_key(factories.user())
    token = access_token(member)
    assert _api("delete", f"/api/llm-quota/keys/{key.pk}/", token).status_code == 404
    assert _api("get", f"/api/llm-quota/keys/{key.pk}/usage/", token).status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def test_a_key_limit_refuses_with_its_name_and_the_user_keeps_the_rest(member):
    _key, plaintext = api_key(member, requests_per_minute=1)
    assert _chat(plaintext).status_code == 200
    refused = _chat(plaintext)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "key.requests_per_minute" in error["message"]
    assert refused["x-ratelimit-limit-requests"] == "1"
    assert int(refused["Retry-After"]) >= 1
    assert _chat(access_token(member)).status_code == 200  # the user's own JWT still works


def test_a_key_budget_is_insufficient_quota(member):
    _key, plaintext = api_key(member, tokens_per_month=10)
    refused = _chat(plaintext, max_tokens=100)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert "key.tokens_per_month" in refused.json()["error"]["message"]
    assert refused["x-should-retry"] == "false"


def test_key_usage_counts_only_that_keys_calls(member):
    key, plaintext = api_key(member, tokens_per_day=10_000)
    assert _chat(plaintext).status_code == 200
    assert _chat(access_token(member)).status_code == 200
    usage = _api("get", f"/api/llm-quota/keys/{key.pk}/usage/", plaintext)
    assert usage.status_code == 200, usage.content
    body = usage.json()
    assert body["usage"]["requests_this_month"] == 1
    assert body["usage"]["tokens_today"] == body["usage"]["settled_this_month"] > 0
    assert body["remaining"]["tokens_per_day"] == 10_000 - body["usage"]["tokens_today"]
    assert body["last_used_at"] is not None


@pytest.mark.parametrize("stream", [False, True])
def test_a_warm_request_with_a_key_makes_no_sql_query(member, stream, django_assert_num_queries):
    from llm_quota.ledger.config_broadcast import listener

    _key, plaintext = api_key(member)
    assert _chat(plaintext, stream=stream).status_code == 200  # cold: key, tier, price load
    # This test's KEY_PREFIX is new: the listener subscribes afresh, dropping the cache.
    assert listener.subscribed.wait(5)
    assert _chat(plaintext, stream=stream).status_code == 200
    with django_assert_num_queries(0):
        assert _chat(plaintext, stream=stream).status_code == 200


def test_the_snapshot_copies_key_usage_and_last_use_without_a_write_per_request(member):
    from llm_quota.models import ApiKeyUsageSnapshot
    from llm_quota.reporting.snapshot import snapshot_usage

    key, plaintext = api_key(member)
    with CaptureQueriesContext(connection) as queries:
        for _ in range(3):
            assert _chat(plaintext).status_code == 200
    assert not [q for q in queries if "UPDATE" in q["sql"] and "apikey" in q["sql"]]
    key.refresh_from_db()
    assert key.last_used_at is None  # not written by the requests
    run = snapshot_usage(full=True)
    assert run.keys == 1
    row = ApiKeyUsageSnapshot.objects.get(api_key=key)
    assert row.requests == 3 and row.base_tokens > 0
    key.refresh_from_db()
    assert key.last_used_at is not None
    snapshot_usage(full=True)  # again: the same figures, nothing doubled
    assert ApiKeyUsageSnapshot.objects.get(api_key=key).requests == 3


def test_the_admin_shows_a_new_key_once_and_lists_prefix_last_use_and_usage(member, admin_client):
    from django.urls import reverse

    added = admin_client.post(
        reverse("admin:llm_quota_apikey_add"),
        {"user": member.pk, "name": "from-admin", "scopes": "", "expires_at_0": "",
         "expires_at_1": "", "requests_per_minute": "", "tokens_per_day": "",
         "tokens_per_month": "", "snapshots-TOTAL_FORMS": "0",
         "snapshots-INITIAL_FORMS": "0"},
        follow=True,
    )  # fmt: skip
    assert added.status_code == 200
    shown = [str(m) for m in added.context["messages"] if "<code>llmq_" in str(m)]
    assert len(shown) == 1
    plaintext = shown[0].split("<code>")[1].split("</code>")[0]
    key = ApiKey.objects.get(name="from-admin")
    assert key.key_hash == hash_api_key(plaintext)
    assert _chat(plaintext).status_code == 200  # the key shown works
    listing = admin_client.get(reverse("admin:llm_quota_apikey_changelist")).content.decode()
    assert key.prefix in listing and plaintext not in listing and key.key_hash not in listing
    page = admin_client.get(reverse("admin:llm_quota_apikey_change", args=[key.pk]))
    assert (
        plaintext not in page.content.decode() and "1 requests this month" in page.content.decode()
    )
    admin_client.post(
        reverse("admin:llm_quota_apikey_changelist"),
        {"action": "revoke_keys", "_selected_action": [key.pk]},
    )
    assert _chat(plaintext).status_code == 401


def test_the_openapi_schema_documents_the_key_endpoints_and_the_key_scheme():
    schema = Client().get("/api/schema/?format=json").json()
    assert {"/api/llm-quota/keys/", "/api/llm-quota/keys/{key_id}/usage/"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


@pytest.mark.urls("tests.integration.pipeline_urls")
def test_the_throttle_in_a_host_view_reserves_the_keys_limits(member):
    key, plaintext = api_key(member, requests_per_minute=1)
    first = _api("post", "/drf/keyed", plaintext, BODY)
    assert first.status_code == 200, first.content
    refused = _api("post", "/drf/keyed", plaintext, BODY)
    assert refused.status_code == 429 and refused.json()["limit"] == "key.requests_per_minute"
    assert _api("post", "/drf/keyed", access_token(member), BODY).status_code == 200
    from llm_quota.ledger.default import get_ledger

    assert get_ledger().key_usage(member.pk, key.pk).requests == 1


@pytest.mark.urls("tests.integration.pipeline_urls")
def test_a_quota_gated_view_takes_a_key_and_charges_it(member):
    from llm_quota.ledger.default import get_ledger

    key, plaintext = api_key(member, tokens_per_day=10_000)
    assert _api("post", "/plain", plaintext, BODY).status_code == 200
    assert get_ledger().key_usage(member.pk, key.pk).requests == 1
    _revoked, other = api_key(member, revoked_at=timezone.now())
    assert _api("post", "/plain", other, BODY).status_code == 401


def test_made_up_keys_are_not_cached(member):
    from llm_quota.rules.config_cache import config_cache

    for n in range(5):
        assert _chat(f"llmq_madeup{n:03d}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").status_code == 401
    assert not [k for k in config_cache._entries if isinstance(k, tuple) and k[0] == "api-key"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 101},
        {"name": "x", "requests_per_minute": 0},
        {"name": "x", "tokens_per_day": -5},
        {"name": "x", "tokens_per_month": "lots"},
        {"name": "x", "expires_at": "yesterday"},
        {"name": "x", "expires_at": "2001-01-01T00:00:00Z"},
        {"name": "x", "team": "acme"},
        {"name": "x", "scopes": 5},
        ["not", "an", "object"],
    ],
)
def test_bad_key_requests_get_400_and_make_no_key(member, body):
    refused = _api("post", "/api/llm-quota/keys/", access_token(member), body)
    assert refused.status_code == 400, refused.content
    assert not ApiKey.objects.exists()


def test_an_undecodable_or_oversized_bearer_is_a_401_not_a_500(member):
    for header in (b"Bearer llmq_\xff\xfe", "Bearer llmq_" + "a" * 500):
        response = Client().post(
            "/v1/chat/completions", json.dumps(BODY), content_type="application/json",
            HTTP_AUTHORIZATION=header,
        )  # fmt: skip
        assert response.status_code == 401


def test_a_keys_budget_alerts_its_owner_once_per_key_and_period(member):
    """The first refusal by a key's own budget sends ``budget_exhausted`` to the key's
    owner, naming the key; more refusals in the period, and another key's, do not
    repeat it for this key."""
    from llm_quota.quota.alerts import sent
    from llm_quota.signals import budget_exhausted

    first, first_plain = api_key(member, tokens_per_month=10)
    second, second_plain = api_key(member, name="other", tokens_per_month=10)
    seen = []

    def receiver(**kwargs):
        seen.append(kwargs)

    budget_exhausted.connect(receiver, weak=False, dispatch_uid="key-budget-test")
    try:
        for _ in range(3):
            assert _chat(first_plain, max_tokens=100).status_code == 429
        assert _chat(second_plain, max_tokens=100).status_code == 429
    finally:
        budget_exhausted.disconnect(dispatch_uid="key-budget-test")
        sent.clear()
    assert [(a["user_id"], a["limit"], a["api_key_id"]) for a in seen] == [
        (str(member.pk), "key.tokens_per_month", str(first.pk)),
        (str(member.pk), "key.tokens_per_month", str(second.pk)),
    ]
    assert seen[0]["event"]["event"] == "budget_exhausted"
