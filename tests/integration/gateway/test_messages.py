"""``POST /v1/messages`` through the gateway, the official anthropic SDK as the client
(``base_url`` and ``api_key`` changed, nothing else), on the sync and the async view:
Claude's prompt reserved on its byte bound and settled on the reported usage, streams
relayed as Anthropic's named events, refusals and bad bodies in Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from django.test import Client

from llm_quota.rules.estimation import byte_bound
from llm_quota.shapes.messages import TOOL_PROMPT_TOKENS
from tests.support import factories
from tests.support.gateway import access_token

pytestmark = pytest.mark.django_db(transaction=True)

CLAUDE = "claude-sonnet-4-5"
MSGS = [{"role": "user", "content": "Say hello in five words."}]
SCHEMA = {"type": "object", "properties": {"id": {"type": "string"}}}
TOOLS = [{"name": "lookup", "description": "Find an order by id.", "input_schema": SCHEMA}]


@pytest.fixture
def user(either_gateway):
    factories.price(CLAUDE, "3", "15", context_window=200_000)
    factories.tier("free", is_default=True, tokens_per_month=1_000_000, requests_per_minute=10)
    return factories.user()


def test_a_message_is_charged_what_the_upstream_reported(either_gateway, user):
    raw = either_gateway.anthropic(user).messages.with_raw_response.create(
        model=CLAUDE, max_tokens=40, messages=MSGS, system="Be brief."
    )
    message = raw.parse()
    assert message.content[0].text.startswith("Fake reply from")
    used = either_gateway.model_usage(user, CLAUDE)
    assert (used.requests, used.input_tokens, used.output_tokens) == (
        1, message.usage.input_tokens, message.usage.output_tokens,
    )  # fmt: skip
    live = either_gateway.usage(user)
    assert live.tokens_this_month == 3 * used.input_tokens + 15 * used.output_tokens
    assert live.reserved == 0
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "10"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "9"
    assert raw.headers["anthropic-ratelimit-tokens-limit"] == "1000000"
    assert "T" in raw.headers["anthropic-ratelimit-tokens-reset"]


def test_the_stream_helper_gets_anthropics_events_and_the_usage_is_settled(
    either_gateway, user
):
    with either_gateway.anthropic(user).messages.stream(
        model=CLAUDE, max_tokens=40, messages=MSGS
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and text.startswith("Fake reply")
    used = either_gateway.model_usage(user, CLAUDE)
    assert (used.input_tokens, used.output_tokens) == (
        final.usage.input_tokens, final.usage.output_tokens,
    )  # fmt: skip
    assert either_gateway.usage(user).reserved == 0


def test_stream_true_relays_named_events(either_gateway, user):
    events = list(either_gateway.anthropic(user).messages.create(
        model=CLAUDE, max_tokens=10, messages=MSGS, stream=True
    ))  # fmt: skip
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds


def test_the_prompt_is_reserved_on_its_byte_bound_and_tools_on_their_system_prompt(
    either_gateway, user
):
    raw = either_gateway.anthropic(user).messages.with_raw_response.create(
        model=CLAUDE, max_tokens=40, messages=MSGS, tools=TOOLS
    )
    raw.parse()
    reserved = 1_000_000 - int(raw.headers["anthropic-ratelimit-tokens-remaining"])
    text_bytes = byte_bound(MSGS[0]["content"])
    # At least every byte of the prompt and the tool prompt's bound, as input (3 each),
    # and the whole cap as output (15 each).
    assert reserved >= 3 * (text_bytes + TOOL_PROMPT_TOKENS) + 15 * 40


def test_x_api_key_and_bearer_both_authenticate(either_gateway, user):
    url = either_gateway.base_url + "/messages"
    body = {"model": CLAUDE, "max_tokens": 5, "messages": MSGS}
    token = access_token(user)
    for headers in ({"x-api-key": token}, {"Authorization": f"Bearer {token}"}):
        assert httpx.post(url, json=body, headers=headers).status_code == 200
    refused = httpx.post(url, json=body, headers={"x-api-key": "not-a-token"})
    assert refused.status_code == 401
    assert refused.json()["type"] == "error"
    assert refused.json()["error"]["type"] == "authentication_error"


def test_a_budget_refusal_is_anthropics_rate_limit_error_and_never_retried(either_gateway):
    factories.price(CLAUDE, "3", "15")
    factories.tier("free", is_default=True, tokens_per_day=100, requests_per_minute=10)
    user = factories.user()
    with pytest.raises(anthropic.RateLimitError) as info:
        either_gateway.anthropic(user, max_retries=3).messages.create(
            model=CLAUDE, max_tokens=100, messages=MSGS
        )
    error = info.value
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "rate_limit_error"
    assert "tokens_per_day" in error.body["error"]["message"]
    headers = error.response.headers
    assert headers["x-should-retry"] == "false" and int(headers["retry-after"]) >= 1
    assert headers["anthropic-ratelimit-requests-remaining"] == "10"
    assert either_gateway.usage(user).requests_this_minute == 0  # one try, refused


def test_a_forbidden_model_is_a_permission_error(either_gateway):
    factories.price(CLAUDE, "3", "15")
    factories.tier("free", is_default=True, allowed_models="gpt-4o")
    with pytest.raises(anthropic.PermissionDeniedError) as info:
        either_gateway.anthropic(factories.user()).messages.create(
            model=CLAUDE, max_tokens=10, messages=MSGS
        )
    assert info.value.body["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    "body",
    [
        {"model": CLAUDE, "messages": MSGS},  # max_tokens is required
        {"model": CLAUDE, "max_tokens": 0, "messages": MSGS},
        {"model": CLAUDE, "max_tokens": "5", "messages": MSGS},
        {"model": CLAUDE, "max_tokens": 5, "messages": []},
        {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
        {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
        {"model": CLAUDE, "max_tokens": 5, "messages": MSGS, "system": 5},
        {"model": CLAUDE, "max_tokens": 5, "messages": MSGS, "tools": {}},
        {"model": CLAUDE, "max_tokens": 5, "messages": MSGS, "stream": "yes"},
        {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "\ud800"}]},
        {"max_tokens": 5, "messages": MSGS},
        [],
    ],
)
def test_bad_bodies_are_400_in_anthropics_shape_with_nothing_reserved(
    either_gateway, user, body
):
    response = httpx.post(
        either_gateway.base_url + "/messages", content=json.dumps(body),
        headers={"x-api-key": access_token(user), "content-type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 400
    answer = response.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]
    live = either_gateway.usage(user)
    assert live.reserved == 0 and live.tokens_this_month == 0


def test_bad_json_is_400_in_anthropics_shape(gateway):
    factories.tier("free", is_default=True)
    response = Client().post(
        "/v1/messages", b"{not json", content_type="application/json",
        headers={"x-api-key": access_token(factories.user())},
    )  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- against upstreams that bill, cut and trickle --------------------------------------

LONG_SYSTEM = "You answer questions about orders, invoices and deliveries. " * 40


@pytest.mark.parametrize("stream", [False, True])
def test_billed_by_the_oracle_is_at_most_what_was_reserved(gateway, oracle, stream):
    """The oracle bills Claude's text with a real BPE, the tool-use prompt, and the whole
    cap (half thinking): the byte bound holds it, and the usage is what is charged."""
    factories.price(CLAUDE, "3", "15", context_window=200_000)
    factories.tier("free", is_default=True, tokens_per_month=1_000_000)
    user = factories.user()
    client = gateway.anthropic(user)
    options = {
        "model": CLAUDE, "max_tokens": 300, "system": LONG_SYSTEM, "tools": TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 150},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Where is 42?"}]},
                     {"role": "assistant", "content": "Let me look."},
                     {"role": "user", "content": "ünïcödé ✓ " * 30}],
    }  # fmt: skip
    if stream:
        with client.messages.stream(**options) as events:
            headers = events.response.headers
            reserved = 1_000_000 - int(headers["anthropic-ratelimit-tokens-remaining"])
            final = events.get_final_message()
    else:
        raw = client.messages.with_raw_response.create(**options)
        reserved = 1_000_000 - int(raw.headers["anthropic-ratelimit-tokens-remaining"])
        final = raw.parse()
    ((_body, usage),) = oracle.bills
    billed = 3 * usage["input_tokens"] + 15 * usage["output_tokens"]
    assert billed <= reserved
    assert final.usage.output_tokens == usage["output_tokens"] == 300
    assert gateway.usage(user).tokens_this_month == billed
    assert gateway.usage(user).reserved == 0


@pytest.fixture
def up_user(either_gateway, upstream):
    factories.tier("free", is_default=True)
    return factories.user()


@pytest.mark.parametrize("model", ["up-truncate", "up-drop"])
def test_a_stream_cut_short_raises_in_the_sdk_and_is_charged_what_was_sent(
    either_gateway, up_user, model
):
    from tests.support.fake_upstream import DROP_AFTER

    seen = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with either_gateway.anthropic(up_user).messages.stream(
            model=model, max_tokens=30, messages=MSGS
        ) as stream:
            for text in stream.text_stream:
                seen.append(text)
    assert info.value.body["error"]["type"] == "api_error"
    assert len(seen) == DROP_AFTER
    used = either_gateway.model_usage(up_user, model)
    assert (used.requests, used.output_tokens) == (1, DROP_AFTER)
    assert either_gateway.usage(up_user).reserved == 0


def test_a_client_leaving_mid_stream_is_charged_what_was_generated(
    either_gateway, upstream, up_user
):
    import time

    from tests.support.fake_upstream import WORDS

    body = {"model": "up-trickle", "messages": MSGS, "max_tokens": WORDS, "stream": True}
    received = 0
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", either_gateway.base_url + "/messages", json=body,
                           headers={"x-api-key": access_token(up_user)}) as answer:  # fmt: skip
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line == "event: content_block_delta":
                    received += 1
                if received == 3:
                    break  # the client hangs up
    deadline = time.monotonic() + 10
    while either_gateway.usage(up_user).reserved and time.monotonic() < deadline:
        time.sleep(0.05)
    live = either_gateway.usage(up_user)
    assert live.reserved == 0 and live.in_flight == 0
    used = either_gateway.model_usage(up_user, "up-trickle")
    assert received <= used.output_tokens <= upstream.sent["up-trickle"] < WORDS
    assert used.input_tokens > 0 and used.requests == 1


def test_a_stream_without_usage_is_charged_its_counted_output(either_gateway, up_user):
    events = either_gateway.anthropic(up_user).messages.create(
        model="up-no-usage", max_tokens=12, messages=MSGS, stream=True
    )  # the raw events: the SDK's stream helper needs the usage this upstream leaves out
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    used = either_gateway.model_usage(up_user, "up-no-usage")
    assert text and used.output_tokens >= 12  # counted from the text (its bytes, at most)
    assert either_gateway.usage(up_user).reserved == 0


BURST = 64
LIMIT = 60_000


def test_a_64_way_burst_stays_inside_the_budget_with_nothing_left_reserved(
    gateway, oracle, settings
):
    # The demo settings FAIL_OPEN: a reserve slower than Redis's 1 s socket timeout (a
    # loaded machine) would admit blind, past the budget, as the contract allows. Closed,
    # it is a 503 instead, and the budget is a hard invariant.
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "FAIL_OPEN": False}
    import asyncio

    from django.test import AsyncClient, override_settings

    from tests.system.test_async_ledger import run_with_orm

    factories.price(CLAUDE, "1", "5", context_window=200_000)
    factories.tier("free", is_default=True, tokens_per_month=LIMIT)
    user = factories.user()
    headers = {"x-api-key": access_token(user)}

    def body(i: int) -> str:
        message = {"role": "user", "content": f"Request {i}: " + "w " * 300}
        return json.dumps({"model": CLAUDE, "max_tokens": 100, "stream": bool(i % 2),
                           "messages": [message]})  # fmt: skip

    async def main() -> list[int]:
        client = AsyncClient(raise_request_exception=False)
        answers = await asyncio.gather(*(
            client.post("/v1/messages", body(i), content_type="application/json",
                        headers=headers)
            for i in range(BURST)
        ))  # fmt: skip
        for answer in answers:
            if answer.streaming:
                async for _ in answer.streaming_content:
                    pass
        return [answer.status_code for answer in answers]

    with override_settings(ROOT_URLCONF="tests.integration.gateway.async_gateway_urls"):
        statuses = run_with_orm(main)
    billed = sum(u["input_tokens"] + 5 * u["output_tokens"] for _, u in oracle.bills)
    live = gateway.usage(user)
    assert {200, 429} <= set(statuses) <= {200, 429, 503}
    assert statuses.count(200) == len(oracle.bills)
    assert live.reserved == 0 and live.tokens_this_month == billed <= LIMIT


def test_messages_go_to_anthropics_api_with_its_key_and_version_where_set(
    either_gateway, upstream, up_user, settings
):
    """``ANTHROPIC_BASE_URL``: ``x-api-key`` and ``anthropic-version``, no bearer; unset,
    the OpenAI-compatible upstream's ``messages`` with its bearer key."""
    client = either_gateway.anthropic(up_user)
    client.messages.create(model="up-normal", max_tokens=5, messages=MSGS)
    path, headers = upstream.paths[-1]
    assert path == "/v1/messages" and headers["Authorization"] == "Bearer sk-gateway-key"
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "ANTHROPIC_BASE_URL": upstream.url,
                          "ANTHROPIC_API_KEY": "sk-ant-gateway"}  # fmt: skip
    client.messages.create(model="up-normal", max_tokens=5, messages=MSGS)
    path, headers = upstream.paths[-1]
    assert path == "/v1/messages" and "Authorization" not in headers
    assert headers["x-api-key"] == "sk-ant-gateway"
    assert headers["anthropic-version"] == "2023-06-01"
    assert either_gateway.usage(up_user).reserved == 0


def test_a_rate_limit_is_retried_by_the_sdk_after_retry_after(gateway):
    """``rate_limit_exceeded`` carries no ``x-should-retry: false``: the anthropic SDK
    waits ``retry-after`` (1 s) and gets in once the held call ends."""
    import threading
    import time

    from llm_quota import quota_guard

    factories.price(CLAUDE, "3", "15")
    factories.tier("free", is_default=True, max_concurrent_requests=1)
    user = factories.user()
    held = quota_guard(user, model=CLAUDE, messages=MSGS, max_tokens=10).admit()
    with pytest.raises(anthropic.RateLimitError) as info:
        gateway.anthropic(user).messages.create(model=CLAUDE, max_tokens=10, messages=MSGS)
    assert info.value.response.headers["retry-after"] == "1"
    assert "x-should-retry" not in info.value.response.headers
    assert "max_concurrent_requests" in info.value.body["error"]["message"]

    threading.Timer(0.5, held.release).start()
    started = time.monotonic()
    message = gateway.anthropic(user, max_retries=2).messages.create(
        model=CLAUDE, max_tokens=10, messages=MSGS
    )
    assert message.usage.output_tokens > 0
    assert time.monotonic() - started >= 1.0
    assert gateway.usage(user).reserved == 0


def test_an_api_key_as_x_api_key_is_charged_to_the_key_and_its_limit_refuses(
    either_gateway, user
):
    """The anthropic SDK sends its api_key as x-api-key: an llmq_ key works there as it
    does as a Bearer on /v1/chat/completions, and its own limits apply."""
    from llm_quota.ledger.default import get_ledger
    from tests.support.api_keys import api_key

    key, plaintext = api_key(user, requests_per_minute=1)
    root = either_gateway.base_url.removesuffix("/v1")
    client = anthropic.Anthropic(base_url=root, api_key=plaintext, max_retries=0)
    either_gateway.clients.append(client)
    message = client.messages.create(model=CLAUDE, max_tokens=40, messages=MSGS)
    assert message.usage.output_tokens > 0
    assert get_ledger().key_usage(user.pk, key.pk).requests == 1
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(model=CLAUDE, max_tokens=40, messages=MSGS)
    assert refused.value.body["error"]["type"] == "rate_limit_error"
    assert "key.requests_per_minute" in refused.value.body["error"]["message"]
    key.revoked_at = key.created_at
    key.save()
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model=CLAUDE, max_tokens=40, messages=MSGS)
