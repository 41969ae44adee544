"""The gateway on a live server, driven by the official openai SDK (the fake provider upstream)."""

from __future__ import annotations

import calendar
import threading
import time
from datetime import UTC, datetime

import httpx
import openai
import pytest

from llm_quota import quota_guard
from llm_quota.rules.estimation import count_messages
from llm_quota.signals import quota_refused
from tests.support import factories
from tests.support.gateway import MSGS, access_token


@pytest.fixture
def refusals():
    seen = []

    def receiver(**kwargs):
        seen.append(kwargs)

    quota_refused.connect(receiver, weak=False, dispatch_uid="gateway-refusals")
    yield seen
    quota_refused.disconnect(dispatch_uid="gateway-refusals")


def test_completion_is_charged_what_the_upstream_reported(gateway):
    factories.tier("free", is_default=True, requests_per_minute=10, tokens_per_minute=10_000)
    user = factories.user()
    raw = gateway.client(user).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=30
    )
    reply = raw.parse()
    assert reply.choices[0].message.content.startswith("Fake reply from gpt-4o")
    assert 1 <= reply.usage.completion_tokens <= 30
    assert reply.usage.prompt_tokens == count_messages(MSGS, "gpt-4o")
    used = gateway.model_usage(user, "gpt-4o")
    assert (used.requests, used.input_tokens, used.output_tokens) == (
        1, reply.usage.prompt_tokens, reply.usage.completion_tokens,
    )  # fmt: skip
    live = gateway.usage(user)
    assert live.tokens_this_month == reply.usage.prompt_tokens + 4 * reply.usage.completion_tokens
    assert live.reserved == 0 and live.in_flight == 0
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert headers["ratelimit-policy"] == (
        '"requests";q=10;w=60, "tokens";q=10000;w=60;qu="tokens"'
    )
    assert headers["ratelimit"].startswith('"requests";r=9;t=60, "tokens";r=')


def test_token_headers_show_a_monthly_budget_when_the_tier_has_no_minute_limit(gateway):
    """Contract section 6: the -tokens headers describe the token limit with the least
    remaining, so a tier with only a monthly budget still shows what is left."""
    factories.tier("free", is_default=True, tokens_per_month=100_000)
    user = factories.user()
    raw = gateway.client(user).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=30
    )
    headers = raw.headers
    reserved = count_messages(MSGS, "gpt-4o") + 4 * 30  # the estimate held at admission
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert headers["x-ratelimit-remaining-tokens"] == str(100_000 - reserved)
    assert "x-ratelimit-limit-requests" not in headers  # no request limit: left out
    today = datetime.now(UTC)
    month_seconds = calendar.monthrange(today.year, today.month)[1] * 86400
    assert headers["ratelimit-policy"] == f'"tokens";q=100000;w={month_seconds};qu="tokens"'
    month_end = datetime(
        today.year + today.month // 12, today.month % 12 + 1, 1, tzinfo=UTC
    ).timestamp()
    reset = int(headers["ratelimit"].rsplit("t=", 1)[1])
    assert abs(reset - (month_end - time.time())) < 5


def test_token_headers_describe_the_day_budget_when_it_has_least_left(gateway):
    factories.tier("free", is_default=True, tokens_per_day=5_000, tokens_per_month=1_000_000)
    user = factories.user()
    headers = gateway.client(user).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=30
    ).headers
    assert headers["x-ratelimit-limit-tokens"] == "5000"
    assert headers["ratelimit-policy"] == '"tokens";q=5000;w=86400;qu="tokens"'


def test_stream_with_include_usage_is_settled_from_the_usage_chunk(gateway):
    factories.tier("free", is_default=True)
    user = factories.user()
    stream = gateway.client(user).chat.completions.create(
        model="gpt-4o", messages=MSGS, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert len([c for c in chunks if c.choices]) > 3  # passed on chunk by chunk
    assert text.startswith("Fake reply from gpt-4o")
    used = gateway.model_usage(user, "gpt-4o")
    assert (used.input_tokens, used.output_tokens) == (
        final.usage.prompt_tokens, final.usage.completion_tokens,
    )  # fmt: skip
    assert gateway.usage(user).reserved == 0


def test_stream_without_include_usage_hides_the_usage_chunk_but_is_settled(gateway):
    factories.tier("free", is_default=True)
    user = factories.user()
    chunks = list(
        gateway.client(user).chat.completions.create(
            model="gpt-4o", messages=MSGS, max_tokens=40, stream=True
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    used = gateway.model_usage(user, "gpt-4o")
    assert used.requests == 1 and used.output_tokens > 0
    assert gateway.usage(user).reserved == 0


def test_clamped_request_is_sent_the_lower_cap_and_says_so(gateway):
    factories.tier("free", is_default=True, tokens_per_day=150)
    user = factories.user()
    raw = gateway.client(user).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSGS, max_tokens=100
    )
    cap = int(raw.headers["x-llm-quota-max-tokens"])
    prompt = count_messages(MSGS, "gpt-4o")
    assert cap == (150 - prompt) // 4
    assert raw.parse().usage.completion_tokens <= cap
    assert gateway.usage(user).tokens_today <= 150


def test_rate_limit_is_rate_limit_error_and_the_sdk_retries_after_retry_after(gateway, refusals):
    factories.tier("free", is_default=True, max_concurrent_requests=1)
    user = factories.user()
    held = quota_guard(user, model="gpt-4o", messages=MSGS, max_tokens=10).admit()

    with pytest.raises(openai.RateLimitError) as info:
        gateway.client(user).chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=10)
    error = info.value
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_exceeded"
    assert error.response.headers["retry-after"] == "1"
    assert "x-should-retry" not in error.response.headers
    assert "max_concurrent_requests" in error.message

    # The held call ends half a second later; the SDK waits Retry-After (1 s) and gets in.
    threading.Timer(0.5, held.release).start()
    started = time.monotonic()
    reply = gateway.client(user, max_retries=2).chat.completions.create(
        model="gpt-4o", messages=MSGS, max_tokens=10
    )
    assert reply.usage.completion_tokens > 0
    assert time.monotonic() - started >= 1.0
    assert [r["limit"] for r in refusals] == ["max_concurrent_requests"] * 2
    assert gateway.usage(user).reserved == 0


def test_budget_refusal_is_insufficient_quota_and_never_retried(gateway, refusals, clock, ledger):
    # 30 s before midnight: Retry-After is short enough that the SDK *would* retry it,
    # so only x-should-retry: false keeps it from hammering.
    clock.set(datetime(2099, 11, 27, 23, 59, 30, tzinfo=UTC))
    pro = factories.tier("pro")
    factories.tier(
        "free", is_default=True, tokens_per_day=50, upgrade_to=pro,
        upgrade_url="https://example.com/upgrade",
    )  # fmt: skip
    user = factories.user()
    with pytest.raises(openai.RateLimitError) as info:
        gateway.client(user, max_retries=3).chat.completions.create(
            model="gpt-4o", messages=MSGS, max_tokens=100
        )
    error = info.value
    assert len(refusals) == 1  # one request reached the server: no retries
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    headers = error.response.headers
    assert headers["x-should-retry"] == "false"
    assert headers["retry-after"] == "30"
    assert "tokens_per_day" in error.message
    assert error.body["upgrade"] == {"tier": "pro", "url": "https://example.com/upgrade"}
    assert error.body["limit"] == "tokens_per_day"
    assert ledger.usage(user.pk).reserved == 0


def test_missing_scope_and_forbidden_model_are_permission_denied(gateway):
    reader = factories.tier("reader", scopes="usage:read")
    factories.tier("free", is_default=True, allowed_models="gpt-4o-mini")
    with pytest.raises(openai.PermissionDeniedError) as info:
        gateway.client(factories.user(reader)).chat.completions.create(
            model="gpt-4o-mini", messages=MSGS
        )
    assert info.value.code == "insufficient_scope"
    with pytest.raises(openai.PermissionDeniedError) as info:
        gateway.client(factories.user()).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert info.value.code == "model_not_allowed"


def test_no_token_and_a_bad_token_are_authentication_errors(gateway):
    factories.tier("free", is_default=True)
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(
            model="gpt-4o", messages=MSGS, extra_headers={"Authorization": openai.omit}
        )
    assert info.value.code == "missing_api_key"
    bad = openai.OpenAI(base_url=gateway.base_url, api_key="not-a-jwt", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert info.value.code == "invalid_api_key"


def test_refusals_before_admission_leave_no_trace_in_redis(gateway, redis_client, quota_prefix):
    factories.tier("reader", scopes="usage:read", is_default=True)
    reader = factories.user()
    for call in (
        lambda: openai.OpenAI(base_url=gateway.base_url, api_key="x.y.z", max_retries=0)
        .chat.completions.create(model="gpt-4o", messages=MSGS),
        lambda: gateway.client(reader).chat.completions.create(model="gpt-4o", messages=MSGS),
    ):
        with pytest.raises(openai.APIStatusError):
            call()
    assert not list(redis_client.scan_iter(match=f"{quota_prefix}:*"))


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "gpt-4o", "messages": []}, "messages"),
        ({"model": "gpt-4o", "messages": "hello"}, "messages"),
        ({"model": "gpt-4o", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": 42, "messages": MSGS}, "model"),
        ({"model": "gpt-4o", "messages": MSGS, "max_tokens": "many"}, "max_tokens"),
        ({"model": "gpt-4o", "messages": MSGS, "max_tokens": 0}, "max_tokens"),
        ({"model": "gpt-4o", "messages": MSGS, "n": 1000}, "n"),
        ({"model": "gpt-4o", "messages": MSGS, "stream": "yes"}, "stream"),
        ({"model": "gpt-4o", "messages": MSGS, "stream_options": {"include_usage": True}},
         "stream_options"),
        ({"model": "no-such-model", "messages": MSGS}, "model"),
    ],
)  # fmt: skip
def test_bad_input_is_400_naming_the_field_and_reserves_nothing(gateway, body, param):
    factories.tier("free", is_default=True)
    user = factories.user()
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {access_token(user)}"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert gateway.usage(user).reserved == 0 and gateway.usage(user).requests_this_minute == 0


@pytest.mark.parametrize(
    "content, content_type",
    [(b'{"model": "gpt-4o", "messages": [', "application/json"),
     (b"[1, 2, 3]", "application/json"),
     (b"model=gpt-4o", "application/x-www-form-urlencoded")],
)  # fmt: skip
def test_malformed_bodies_are_openai_shaped_errors_not_500(gateway, content, content_type):
    factories.tier("free", is_default=True)
    user = factories.user()
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {access_token(user)}", "Content-Type": content_type},
    )
    assert 400 <= response.status_code < 500, response.text
    assert set(response.json()["error"]) >= {"message", "type", "code", "param"}
    assert gateway.usage(user).reserved == 0


def test_models_lists_what_the_tier_allows(gateway):
    factories.tier("free", is_default=True, allowed_models="gpt-4o-mini")
    client = gateway.client(factories.user())
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini"]
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_n_choices_reserve_and_cap_each_choice(gateway):
    factories.tier("free", is_default=True)
    user = factories.user()
    reply = gateway.client(user).chat.completions.create(
        model="gpt-4o", messages=MSGS, max_tokens=8, n=3
    )
    assert len(reply.choices) == 3
    assert reply.usage.completion_tokens <= 3 * 8
    assert gateway.model_usage(user, "gpt-4o").output_tokens == reply.usage.completion_tokens


def test_redis_down_is_503_with_fail_open_off_and_unmetered_with_it_on(gateway, settings):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from llm_quota.ledger.default import set_default_ledger
    from llm_quota.ledger.sync_driver import Ledger

    factories.tier("free", is_default=True)
    user = factories.user()

    def dead_redis():
        client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                             retry=Retry(NoBackoff(), 0))  # fmt: skip
        set_default_ledger(Ledger(client, prefix="dead"))

    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "FAIL_OPEN": False}
    dead_redis()
    with pytest.raises(openai.InternalServerError) as info:
        gateway.client(user).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert info.value.status_code == 503 and info.value.code == "quota_unavailable"
    assert info.value.response.headers["retry-after"] == "2"  # the breaker's cooldown
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "FAIL_OPEN": True}
    dead_redis()
    reply = gateway.client(user).chat.completions.create(model="gpt-4o", messages=MSGS)
    assert reply.usage.completion_tokens > 0


def test_a_body_over_the_upload_limit_is_413_in_openai_shape(gateway, settings):
    factories.tier("free", is_default=True)
    user = factories.user()
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    with pytest.raises(openai.APIStatusError) as info:
        gateway.client(user).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x" * 5_000}]
        )
    assert info.value.status_code == 413 and info.value.code == "request_too_large"
    assert gateway.usage(user).reserved == 0
