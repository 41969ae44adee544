"""LLMQuotaThrottle with LLMQuotaMiddleware, and @quota_gated: admit before the view, end
every reservation after."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from llm_quota.decorators import FinishedWithStream
from llm_quota.rules.estimation import count_messages, count_output
from tests.support import factories
from tests.support.gateway import MSGS, access_token

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.integration.pipeline_urls")]

BODY = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 20}


@pytest.fixture
def user(ledger):
    factories.price("gpt-4o", "1", "4")
    factories.tier("free", is_default=True, requests_per_minute=50)
    return factories.user()


def post(path, user=None, body=BODY, **extra):
    client = Client(raise_request_exception=False)
    if user is not None:
        extra["HTTP_AUTHORIZATION"] = f"Bearer {access_token(user)}"
    return client.post(path, json.dumps(body), content_type="application/json", **extra)


def charged(ledger, user):
    usage = ledger.usage(user.pk)
    assert usage.reserved == 0 and usage.in_flight == 0
    return usage.tokens_this_month


def test_throttled_view_that_settles_itself_is_charged_its_usage(user, ledger):
    response = post("/drf/settle", user)
    assert response.status_code == 200 and response.json() == {"max_tokens": 20}
    assert response["x-ratelimit-limit-requests"] == "50"
    assert response["x-ratelimit-remaining-requests"] == "49"
    assert charged(ledger, user) == 5 + 3 * 4


def test_middleware_settles_from_the_responses_usage(user, ledger):
    assert post("/drf/usage", user).status_code == 200
    assert charged(ledger, user) == 5 + 3 * 4


def test_middleware_charges_the_estimate_when_no_usage_is_reported(user, ledger):
    assert post("/drf/nothing", user).status_code == 200
    assert charged(ledger, user) == count_messages(MSGS, "gpt-4o") + 20 * 4


def test_middleware_releases_on_an_upstream_failure_the_view_answered(user, ledger):
    assert post("/drf/fail", user).status_code == 502
    assert charged(ledger, user) == 0
    assert ledger.usage(user.pk).requests_this_minute == 1  # it was admitted, then released


def test_middleware_charges_the_estimate_when_the_view_crashed(user, ledger):
    """A bug may follow a billed call: the release rule charges the estimate
    (``test_release_rule`` has every other ending)."""
    assert post("/drf/raise", user).status_code == 500
    assert charged(ledger, user) == count_messages(MSGS, "gpt-4o") + 20 * 4


def test_throttle_refusal_is_429_with_retry_after_and_headers(user, ledger):
    tiny = factories.user(factories.tier("tiny", requests_per_minute=1))
    assert post("/drf/settle", tiny).status_code == 200
    refused = post("/drf/settle", tiny)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "60"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["detail"].startswith("Limit 'requests_per_minute' reached")
    assert "x-should-retry" not in refused
    broke = factories.user(factories.tier("broke", tokens_per_month=10))
    refused = post("/drf/settle", broke)
    assert refused.status_code == 429 and refused["x-should-retry"] == "false"
    assert "tokens_per_month" in refused.json()["detail"]


@pytest.mark.parametrize("style", ["drf/settle", "drf/guarded", "plain/guarded"])
def test_refusals_of_drf_and_guarded_views_carry_limit_retry_after_upgrade_and_headers(
    user, ledger, style
):
    """DRF's default exception handler answers the throttle's and the guard's refusal
    with every key of the README's 429, and the middleware adds the headers it does not
    know (the guard style had none of them)."""

    def refused(who):
        if style.startswith("plain"):
            client = Client(raise_request_exception=False)
            client.force_login(who)
            return client.post(f"/{style}", json.dumps(BODY), content_type="application/json")
        return post(f"/{style}", who)

    pro = factories.tier("pro")
    broke = factories.user(factories.tier("broke", tokens_per_month=10, upgrade_to=pro,
                                          upgrade_url="https://example.com/up"))  # fmt: skip
    response = refused(broke)
    assert response.status_code == 429
    body = response.json()
    assert body["limit"] == "tokens_per_month" and body["detail"].startswith("Limit 'tokens_")
    assert body["upgrade"] == {"tier": "pro", "url": "https://example.com/up"}
    assert body["retry_after"] == int(response["Retry-After"]) >= 1
    assert response["x-should-retry"] == "false"

    tiny = factories.user(factories.tier("tiny", requests_per_minute=1))
    assert refused(tiny).status_code == 200
    response = refused(tiny)
    assert response.status_code == 429
    assert response.json() == {
        "detail": "Limit 'requests_per_minute' reached. Retry after 1 minute.",
        "limit": "requests_per_minute",
        "retry_after": 60,
        "upgrade": None,
    }
    assert response["Retry-After"] == "60" and "x-should-retry" not in response
    assert response["x-ratelimit-limit-requests"] == "1"
    assert response["x-ratelimit-remaining-requests"] == "0"
    assert response["RateLimit"].startswith('"requests";r=0;t=')
    assert charged(ledger, tiny) == 5 + 3 * 4 and charged(ledger, broke) == 0


def test_anonymous_and_out_of_scope_callers_never_reach_redis(user, ledger, redis_client):
    assert post("/drf/anonymous").status_code == 401
    reader = factories.user(factories.tier("reader", scopes="usage:read"))
    assert post("/drf/settle", reader).status_code == 403
    assert post("/plain").status_code == 401
    assert post("/plain", reader).status_code == 403
    assert not list(redis_client.scan_iter(match=f"{ledger.keyspace.prefix}:*"))


def test_plain_view_is_gated_for_session_and_jwt_callers(user, ledger):
    client = Client()
    client.force_login(user)
    response = client.post("/plain", json.dumps(BODY), content_type="application/json")
    assert response.status_code == 200 and response.json()["max_tokens"] == 20
    assert response["x-ratelimit-limit-requests"] == "50"
    assert response["RateLimit"].startswith('"requests";r=49;t=60')
    assert post("/plain", user).status_code == 200
    assert charged(ledger, user) == 2 * (5 + 3 * 4)


def test_plain_view_refusal_is_openai_shaped(user, ledger):
    pro = factories.tier("pro")
    poor = factories.user(factories.tier("poor", tokens_per_day=10, upgrade_to=pro))
    response = post("/plain", poor)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota" and error["limit"] == "tokens_per_day"
    assert error["upgrade"] == {"tier": "pro", "url": ""}
    assert response["x-should-retry"] == "false" and int(response["Retry-After"]) >= 1
    bad = post("/plain", user, body={"model": "gpt-4o", "messages": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    assert charged(ledger, poor) == 0 and charged(ledger, user) == 0


def test_streaming_plain_view_settles_in_its_generator(user, ledger):
    response = post("/plain/stream", user)
    assert b"".join(response.streaming_content) == b"one two"
    prompt = count_messages(MSGS, "gpt-4o")
    assert charged(ledger, user) == prompt + 4 * count_output("one two", "gpt-4o")


def test_streaming_plain_view_that_never_settles_is_charged_the_estimate(user, ledger):
    response = post("/plain/stream-unsettled", user)
    assert ledger.usage(user.pk).reserved > 0  # still streaming: still reserved
    assert b"".join(response.streaming_content) == b"ab"
    response.close()
    assert charged(ledger, user) == count_messages(MSGS, "gpt-4o") + 20 * 4


def test_quota_gated_from_the_middleware_module_still_works_but_warns():
    from llm_quota import decorators

    with pytest.warns(DeprecationWarning, match="llm_quota.decorators"):
        from llm_quota.middleware import quota_gated
    assert quota_gated is decorators.quota_gated


def test_the_middleware_leaves_a_gated_views_reservation_to_the_decorator(user, ledger):
    """One owner: the decorator finishes its stream; the middleware does not wrap it again."""
    response = post("/plain/stream-unsettled", user)
    closers = [getattr(c, "__self__", None) for c in response._resource_closers]
    assert sum(isinstance(c, FinishedWithStream) for c in closers) == 1
    b"".join(response.streaming_content)
    response.close()
    assert charged(ledger, user) == count_messages(MSGS, "gpt-4o") + 20 * 4
