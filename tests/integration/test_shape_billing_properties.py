"""Billed <= reserved for the Responses and Messages APIs, for bodies built at random
(hypothesis), on a real Redis: each admitted as the gateway admits it (its shape's
``quota_kwargs``), sent with the reserved cap, billed by the oracle
(``llm_quota.testing.billing``: the whole cap written), then settled."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm_quota.exceptions import BudgetExceeded, InvalidRequest, RateLimited
from llm_quota.gateway.call import GatedCall
from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.messages import MessagesRequest, charged_usage
from llm_quota.shapes.responses import ResponsesRequest
from llm_quota.testing import billing
from tests.support import factories
from tests.support.billed_requests import functions, names, schemas, texts

pytestmark = pytest.mark.django_db

GPT = ["gpt-4o", "gpt-4o-mini", "o3", "gpt-5-mini"]
CLAUDE = ["claude-sonnet-4-5", "claude-haiku-4-5"]
SETTINGS = settings(
    max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)  # fmt: skip


@pytest.fixture
def prices(ledger):
    for model in GPT + CLAUDE:
        factories.price(model, "0.5", "2", default_max_output_tokens=300, context_window=128_000)


def admitted(user, shape, body):
    request = shape.from_body(body)
    try:
        guard = QuotaGuard(user, **request.quota_kwargs()).admit()
    except (InvalidRequest, BudgetExceeded, RateLimited) as refused:
        event(f"refused: {type(refused).__name__}")
        return None, None
    return guard, GatedCall(request, guard, user).upstream_body()


text_parts = texts.map(lambda text: {"type": "input_text", "text": text})
items = st.lists(
    st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "system", "developer"]),
        "content": st.one_of(texts, st.lists(text_parts, min_size=1, max_size=3)),
    }),
    min_size=1, max_size=4,
)  # fmt: skip
response_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(GPT), "input": st.one_of(texts.filter(bool), items)},
    optional={
        "instructions": texts,
        "tools": st.lists(functions.map(lambda f: {"type": "function", **f}), max_size=3),
        "max_output_tokens": st.integers(1, 400),
    },
)  # fmt: skip


@SETTINGS
@given(body=response_bodies)
def test_no_responses_bill_passes_its_reservation(prices, ledger, body):
    user = factories.user(factories.tier(tokens_per_month=10**7))
    guard, sent = admitted(user, ResponsesRequest, body)
    if guard is None:
        return
    bill = billing.bill_response(sent)
    billed = guard.estimate.price.base_tokens(bill.prompt_tokens, bill.completion_tokens)
    assert billed <= guard.reservation.reserved, (bill, guard.estimate)
    guard.settle(billing.response_usage(bill))
    assert ledger.usage(user.pk).reserved == 0


blocks = st.one_of(
    texts.map(lambda text: {"type": "text", "text": text}),
    st.builds(lambda name, schema: {"type": "tool_use", "id": "t1", "name": name,
                                    "input": {"value": schema}}, names, schemas),  # fmt: skip
)
turns = st.lists(
    st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant"]),
        "content": st.one_of(texts, st.lists(blocks, min_size=1, max_size=3)),
    }),
    min_size=1, max_size=4,
)  # fmt: skip
claude_tools = st.builds(
    lambda name, description, schema: {"name": name, "description": description,
                                       "input_schema": {"type": "object",
                                                        "properties": {"x": schema}}},
    names, texts, schemas,
)  # fmt: skip
#: A system prompt that asks for prompt caching, at either TTL (or the default, 5m):
#: Anthropic may then bill the whole prompt as cache writes, at up to 2x the input price.
cached_system = st.builds(
    lambda text, ttl: [{"type": "text", "text": text,
                        "cache_control": {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}}],
    texts, st.sampled_from([None, "5m", "1h"]),
)  # fmt: skip
message_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(CLAUDE), "messages": turns, "max_tokens": st.integers(1, 400)},
    optional={"system": st.one_of(texts, cached_system),
              "tools": st.lists(claude_tools, min_size=1, max_size=3)},
)  # fmt: skip


@SETTINGS
@given(body=message_bodies)
def test_no_messages_bill_passes_its_reservation(prices, ledger, body):
    user = factories.user(factories.tier(tokens_per_month=10**7))
    guard, sent = admitted(user, MessagesRequest, body)
    if guard is None:
        return
    output = sent["max_tokens"]
    usage = billing.claude_usage(sent, output)  # cache writes at their premium, if asked
    charged_input = billing.claude_charged_input(usage)
    event("prompt caching" if usage["cache_creation_input_tokens"] else "no caching")
    billed = guard.estimate.price.base_tokens(charged_input, output)
    assert billed <= guard.reservation.reserved, (charged_input, output, guard.estimate)
    guard.settle(charged_usage(usage))
    assert ledger.usage(user.pk).reserved == 0


@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_a_prompt_cached_at_the_dearest_rate_stays_within_its_reservation(prices, ledger, ttl):
    """Text that tokenizes near one token per byte (random printable ASCII: about 1.3
    bytes a token) leaves the byte bound little room, and a cache write bills each token
    at up to twice the input price: the premium must be reserved, not hoped for."""
    import random
    import string

    rng = random.Random(17)
    text = "".join(rng.choice(string.printable[:94]) for _ in range(4000))
    body = {
        "model": CLAUDE[0], "max_tokens": 50,
        "system": [{"type": "text", "text": text,
                    "cache_control": {"type": "ephemeral", "ttl": ttl}}],
        "messages": [{"role": "user", "content": "Summarise the system prompt."}],
    }  # fmt: skip
    user = factories.user(factories.tier(tokens_per_month=10**7))
    guard, sent = admitted(user, MessagesRequest, body)
    usage = billing.claude_usage(sent, sent["max_tokens"])
    assert usage["cache_creation_input_tokens"] > 0
    billed = guard.estimate.price.base_tokens(billing.claude_charged_input(usage), 50)
    assert billed <= guard.reservation.reserved
    guard.settle(charged_usage(usage))
    assert ledger.usage(user.pk).reserved == 0
