"""Refused callers cost Redis nothing; nobody reads or spends what is not theirs.

The ledger runs on a private redis-server here, so ``INFO commandstats`` counts
exactly the commands these requests caused (only INFO itself is subtracted).
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.test import Client
from rest_framework_simplejwt.tokens import AccessToken

from llm_quota.contrib.jwt.throttling import TokenEndpointThrottle
from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UserQuota
from tests.support import factories

pytestmark = pytest.mark.django_db
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.fixture
def private_ledger(private_redis):
    ledger = Ledger(private_redis.client(), prefix="sec")
    set_default_ledger(ledger)
    return ledger


@pytest.fixture
def setup(private_ledger):
    factories.price("gpt-4o", "1", "4")
    factories.price("claude-x", "1", "4")
    tier = factories.tier("free", is_default=True, allowed_models="gpt-4o",
                          tokens_per_month=10**6)  # fmt: skip
    return tier


def commands(client) -> int:
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if not k.startswith(("cmdstat_info",)))


def access(user) -> str:
    return str(ScopedTokenObtainPairSerializer.get_token(user).access_token)


def chat(token: str | None, body=BODY, raw: bytes | None = None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    data = raw if raw is not None else json.dumps(body)
    return Client().post("/v1/chat/completions", data, content_type="application/json", **headers)


def test_refused_requests_cause_no_redis_command(setup, private_ledger):
    user = factories.user(setup)
    good = access(user)
    expired = AccessToken.for_user(user)
    expired.set_exp(lifetime=-timedelta(minutes=1))
    expired["scope"] = "llm:chat"
    foreign = AccessToken.for_user(user)
    foreign["scope"] = "llm:chat"
    forged = str(foreign)
    header, payload, _ = forged.split(".")
    forged_with_other_key = f"{header}.{payload}.c2lnbmVkIGJ5IHNvbWVib2R5IGVsc2U"
    reader = factories.user(factories.tier("reader", scopes="usage:read"))
    blocked = factories.user(setup, blocked=True)
    blocked_token = access(blocked)
    UserQuota.objects.filter(user=blocked).update(blocked=True)
    UserQuota.objects.get(user=blocked).save()

    client = private_ledger.client
    before = commands(client)
    cases = [
        (chat(None), 401),
        (chat("not-a-jwt"), 401),
        (chat(str(expired)), 401),
        (chat(good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")), 401),
        (chat(forged_with_other_key), 401),
        (chat(access(reader)), 403),
        (chat(blocked_token), 403),
        (chat(good, {**BODY, "model": "claude-x"}), 403),
        (chat(good, {**BODY, "model": "no-such-model"}), 400),
        (chat(good, {**BODY, "max_tokens": -1}), 400),
        (chat(good, {**BODY, "max_tokens": 10**12}), 400),
        (chat(good, {**BODY, "messages": "hi"}), 400),
        (chat(good, {**BODY, "model": "gpt-4o}:{u:1}"}), 400),
        (chat(good, raw=b"{not json"), 400),
        (chat(good, raw=b'{"model": "\xff\xfe"}'), 400),
    ]
    statuses = [(response.status_code, expected) for response, expected in cases]
    wrong = [(n, got, expected) for n, (got, expected) in enumerate(statuses) if got != expected]
    assert not wrong, wrong
    for response, _ in cases:
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}
    assert commands(client) - before == 0
    # The same token, well-formed, does reach Redis: the count above could fail.
    assert chat(good).status_code == 200
    assert commands(client) - before > 0


def test_a_user_reads_only_their_own_usage(setup, private_ledger):
    alice, bob = factories.user(setup), factories.user(setup)
    assert chat(access(bob)).status_code == 200
    api = Client()
    api.force_login(alice)
    mine = api.get("/api/llm-quota/usage/").json()
    assert mine["usage"]["tokens_this_month"] == 0  # bob's spend is not alice's
    assert api.get(f"/api/llm-quota/users/{bob.pk}/usage/").status_code == 403
    staff = factories.user(setup)
    staff.is_staff = True
    staff.save()
    api.force_login(staff)
    theirs = api.get(f"/api/llm-quota/users/{bob.pk}/usage/")
    assert theirs.status_code == 200 and theirs.json()["usage"]["tokens_this_month"] > 0


def test_admin_edits_need_admin_rights(setup):
    clerk = factories.user(setup)
    clerk.is_staff = True  # staff, but without change permissions
    clerk.save()
    client = Client()
    client.force_login(clerk)
    assert client.get(f"/admin/llm_quota/tier/{setup.pk}/change/").status_code == 403
    response = client.post(f"/admin/llm_quota/tier/{setup.pk}/change/", {"name": "hacked"})
    assert response.status_code == 403
    setup.refresh_from_db()
    assert setup.name == "free"


def _token_rate(settings, rate):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"llm_quota_token": rate},
    }


def test_token_endpoint_is_rate_limited_per_address(setup, settings, private_ledger):
    _token_rate(settings, "3/minute")
    set_default_ledger(private_ledger)
    TokenEndpointThrottle._ledgers.clear()
    user = factories.user(setup)
    here, there = Client(REMOTE_ADDR="10.9.8.7"), Client(REMOTE_ADDR="10.9.8.6")
    wrong = {"username": user.username, "password": "guess"}
    codes = [here.post("/api/token/", wrong).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    refused = here.post("/api/token/", {"username": user.username, "password": "pw-123456"})
    assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
    # A spoofed X-Forwarded-For changes nothing without NUM_PROXIES.
    assert here.post("/api/token/", wrong, HTTP_X_FORWARDED_FOR="1.2.3.4").status_code == 429
    assert there.post("/api/token/", wrong).status_code == 401
    TokenEndpointThrottle._ledgers.clear()


def test_token_endpoint_rate_none_turns_the_limit_off(setup, settings):
    _token_rate(settings, None)
    user = factories.user(setup)
    wrong = {"username": user.username, "password": "guess"}
    client = Client(REMOTE_ADDR="10.9.8.5")
    assert {client.post("/api/token/", wrong).status_code for _ in range(21)} == {401}


def test_token_endpoint_keeps_20_a_minute_without_a_drf_rate(settings):
    settings.REST_FRAMEWORK = {
        k: v for k, v in settings.REST_FRAMEWORK.items() if k != "DEFAULT_THROTTLE_RATES"
    }
    throttle = TokenEndpointThrottle()
    assert (throttle.num_requests, throttle.duration) == (20, 60)


def test_deprecated_token_requests_per_minute_is_honoured_over_the_drf_rate(
    setup, settings, private_ledger
):
    _token_rate(settings, "50/minute")
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "TOKEN_REQUESTS_PER_MINUTE": 2}
    TokenEndpointThrottle._ledgers.clear()
    user = factories.user(setup)
    wrong = {"username": user.username, "password": "guess"}
    client = Client(REMOTE_ADDR="10.9.8.4")
    assert [client.post("/api/token/", wrong).status_code for _ in range(3)] == [401, 401, 429]
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "TOKEN_REQUESTS_PER_MINUTE": 0}  # off, as before
    assert TokenEndpointThrottle().rate is None
    TokenEndpointThrottle._ledgers.clear()
