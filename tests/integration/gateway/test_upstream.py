"""The gateway against an upstream of the tests' own: after every case, usage equals what
the upstream reported (or generated) and nothing stays reserved."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from llm_quota.rules.estimation import count_messages, count_output
from llm_quota.rules.pricing import price_for
from tests.support import factories, fake_upstream
from tests.support.fake_upstream import PROMPT, WORDS
from tests.support.gateway import MSGS, access_token


@pytest.fixture
def user(gateway, upstream):
    factories.tier("free", is_default=True)
    return factories.user()


def assert_settled(gateway, user, model, *, input_tokens, output_tokens, requests=1):
    used = gateway.model_usage(user, model)
    assert used is not None, "nothing was settled"
    assert (used.requests, used.input_tokens, used.output_tokens) == (
        requests, input_tokens, output_tokens,
    )  # fmt: skip
    assert used.base_tokens == input_tokens + 2 * output_tokens  # up-* costs 1 in, 2 out
    live = gateway.usage(user)
    assert live.reserved == 0 and live.in_flight == 0


def assert_nothing_charged(gateway, user):
    live = gateway.usage(user)
    assert live.tokens_this_month == 0 and live.reserved == 0 and live.in_flight == 0


def test_upstream_gets_the_reserved_cap_and_its_usage_is_charged(gateway, upstream, user):
    reply = gateway.client(user).chat.completions.create(
        model="up-normal", messages=MSGS, max_tokens=12
    )
    sent = upstream.requests[-1]
    assert sent["max_tokens"] == 12 and "stream_options" not in sent
    assert upstream.authorizations[-1] == "Bearer sk-gateway-key"  # the caller's JWT stays here
    assert reply.usage.completion_tokens == 12
    assert_settled(gateway, user, "up-normal", input_tokens=PROMPT, output_tokens=12)


def test_a_request_without_max_tokens_is_sent_the_default_cap(gateway, upstream, user):
    gateway.client(user).chat.completions.create(model="up-normal", messages=MSGS)
    assert upstream.requests[-1]["max_tokens"] == price_for("up-normal").default_max_output_tokens


def test_max_completion_tokens_is_capped_under_its_own_name(gateway, upstream, user):
    gateway.client(user).chat.completions.create(
        model="up-normal", messages=MSGS, max_completion_tokens=9
    )
    sent = upstream.requests[-1]
    assert sent["max_completion_tokens"] == 9 and "max_tokens" not in sent


def test_a_clamped_request_sends_the_clamped_cap_upstream(gateway, upstream):
    factories.tier("free", is_default=True, tokens_per_day=60)
    user = factories.user()
    raw = gateway.client(user).chat.completions.with_raw_response.create(
        model="up-normal", messages=MSGS, max_tokens=100
    )
    cap = int(raw.headers["x-llm-quota-max-tokens"])
    assert upstream.requests[-1]["max_tokens"] == cap < 100
    assert gateway.usage(user).reserved == 0


def test_slow_upstream(gateway, upstream, user):
    reply = gateway.client(user).chat.completions.create(
        model="up-slow", messages=MSGS, max_tokens=20
    )
    assert reply.usage.completion_tokens == 20
    assert_settled(gateway, user, "up-slow", input_tokens=PROMPT, output_tokens=20)
    chunks = list(
        gateway.client(user).chat.completions.create(
            model="up-slow", messages=MSGS, max_tokens=5, stream=True
        )
    )
    assert chunks
    assert_settled(gateway, user, "up-slow", input_tokens=2 * PROMPT, output_tokens=25,
                   requests=2)  # fmt: skip


def test_upstream_500_releases_and_is_returned_in_openai_shape(gateway, upstream, user):
    with pytest.raises(openai.InternalServerError) as info:
        gateway.client(user).chat.completions.create(model="up-500", messages=MSGS)
    assert info.value.status_code == 500
    assert info.value.body["message"] == "upstream exploded"
    with pytest.raises(openai.InternalServerError):
        gateway.client(user).chat.completions.create(model="up-500", messages=MSGS, stream=True)
    assert_nothing_charged(gateway, user)


def test_upstream_rate_limit_is_passed_on_with_its_retry_after(gateway, upstream, user):
    with pytest.raises(openai.RateLimitError) as info:
        gateway.client(user).chat.completions.create(model="up-429", messages=MSGS)
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.body["message"] == "upstream rate limit"
    assert_nothing_charged(gateway, user)


def test_missing_usage_is_settled_from_the_counted_output(gateway, upstream, user):
    reply = gateway.client(user).chat.completions.create(
        model="up-no-usage", messages=MSGS, max_tokens=15
    )
    assert reply.usage is None
    counted = count_output(reply.choices[0].message.content, "up-no-usage")
    assert counted == 15
    # The prompt is charged as the estimate counted it, the output as counted on the text.
    assert_settled(gateway, user, "up-no-usage",
                   input_tokens=count_messages(MSGS, "up-no-usage"), output_tokens=15)  # fmt: skip


def test_stream_without_a_usage_chunk_is_settled_from_the_streamed_text(gateway, upstream, user):
    chunks = list(
        gateway.client(user).chat.completions.create(
            model="up-no-usage", messages=MSGS, max_tokens=15, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert count_output(text, "up-no-usage") == 15
    assert_settled(gateway, user, "up-no-usage",
                   input_tokens=count_messages(MSGS, "up-no-usage"), output_tokens=15)  # fmt: skip


def test_stream_asks_upstream_for_usage_and_settles_from_it(gateway, upstream, user):
    chunks = list(
        gateway.client(user).chat.completions.create(
            model="up-normal", messages=MSGS, max_tokens=10, stream=True
        )
    )
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    assert upstream.requests[-1]["max_tokens"] == 10
    assert all(c.usage is None for c in chunks)  # the caller did not ask for it
    assert_settled(gateway, user, "up-normal", input_tokens=PROMPT, output_tokens=10)


def test_upstream_that_ignores_max_tokens_is_charged_what_it_reported(gateway, upstream, user):
    reply = gateway.client(user).chat.completions.create(
        model="up-ignores-cap", messages=MSGS, max_tokens=10
    )
    assert upstream.requests[-1]["max_tokens"] == 10
    assert reply.usage.completion_tokens == 10 + fake_upstream.EXTRA
    assert_settled(gateway, user, "up-ignores-cap", input_tokens=PROMPT,
                   output_tokens=10 + fake_upstream.EXTRA)  # fmt: skip


def test_dropped_upstream_mid_stream_charges_what_was_sent(gateway, upstream, user):
    stream = gateway.client(user).chat.completions.create(
        model="up-drop", messages=MSGS, max_tokens=30, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "mid-stream" in info.value.message
    assert len(seen) == fake_upstream.DROP_AFTER
    used = gateway.model_usage(user, "up-drop")
    assert used.output_tokens == count_output("".join(seen), "up-drop") == fake_upstream.DROP_AFTER
    assert gateway.usage(user).reserved == 0


def test_unreachable_upstream_is_502_and_releases(gateway, upstream, user, settings):
    upstream.stop()
    with pytest.raises(openai.APIStatusError) as info:
        gateway.client(user).chat.completions.create(model="up-normal", messages=MSGS)
    assert info.value.status_code == 502 and info.value.code == "upstream_unreachable"
    assert_nothing_charged(gateway, user)


def test_client_disconnecting_mid_stream_is_charged_for_what_was_generated(gateway, upstream, user):
    body = {"model": "up-trickle", "messages": MSGS, "max_tokens": WORDS, "stream": True}
    headers = {"Authorization": f"Bearer {access_token(user)}"}
    received = 0
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", gateway.base_url + "/chat/completions", json=body,
                           headers=headers) as response:  # fmt: skip
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received += 1
                if received == 3:
                    break  # the client hangs up: closing the response drops the connection
    # The gateway notices on its next write, charges what was generated, releases the rest.
    deadline = time.monotonic() + 10
    while gateway.usage(user).reserved and time.monotonic() < deadline:
        time.sleep(0.05)
    live = gateway.usage(user)
    assert live.reserved == 0 and live.in_flight == 0
    used = gateway.model_usage(user, "up-trickle")
    generated = upstream.sent["up-trickle"]
    assert received <= used.output_tokens <= generated < WORDS
    assert used.input_tokens > 0 and used.requests == 1
