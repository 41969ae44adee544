"""Properties of estimation, pricing and request parsing, over inputs nobody would
think to write by hand (hypothesis). No Redis: these are the pure parts the gate
trusts before it reserves anything."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_quota.exceptions import InvalidRequest
from llm_quota.rules.accounting import (
    MAX_REPORTED_TOKENS,
    MICRO,
    ActualUsage,
    Price,
    to_micro,
    token_count,
)
from llm_quota.rules.estimation import count_messages, prompt_bounds
from llm_quota.shapes.chat import ChatRequest

#: Every model family the gateway meets: both tiktoken encodings and the fallback.
MODELS = ["gpt-4o", "gpt-4", "gpt-3.5-turbo", "claude-sonnet-4-5", "some-new-model"]

texts = st.text(max_size=300)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": texts})}
    ),
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
            "content": st.one_of(texts, st.lists(parts, max_size=4), st.none()),
        },
        optional={"name": st.text(max_size=20)},
    ),
    min_size=1,
    max_size=6,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
multipliers = st.decimals(min_value=0, max_value=100, places=6, allow_nan=False)
counts = st.integers(min_value=0, max_value=10**9)

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(messages=st.one_of(messages, texts), model=st.sampled_from(MODELS))
def test_count_messages_never_raises_and_stays_within_prompt_bounds(messages, model):
    lower, upper = prompt_bounds(messages)
    counted = count_messages(messages, model)
    assert isinstance(counted, int)
    assert lower <= counted <= upper


@fuzz
@given(messages=messages, more=texts, model=st.sampled_from(MODELS))
def test_a_longer_message_never_counts_fewer_tokens_than_the_envelope_allows(messages, more, model):
    """Appending a message adds at least the per-message overhead: a prompt can't get
    cheaper by growing."""
    longer = [*messages, {"role": "user", "content": more}]
    assert count_messages(longer, model) > count_messages(messages, model)


@fuzz
@given(inp=multipliers, out=multipliers, input_tokens=counts, output_tokens=counts)
def test_base_tokens_is_the_ceiling_of_the_decimal_formula(inp, out, input_tokens, output_tokens):
    price = Price("m", to_micro(inp), to_micro(out))
    exact = Decimal(input_tokens) * inp + Decimal(output_tokens) * out
    assert price.base_tokens(input_tokens, output_tokens) == math.ceil(exact)


@fuzz
@given(
    inp=multipliers,
    cached=multipliers,
    out=multipliers,
    input_tokens=counts,
    cached_tokens=st.integers(min_value=-5, max_value=10**9),
    output_tokens=counts,
)
def test_cached_input_is_priced_at_its_own_rate_and_never_beyond_the_input(
    inp, cached, out, input_tokens, cached_tokens, output_tokens
):
    price = Price("m", to_micro(inp), to_micro(out), cached_input_micro=to_micro(cached))
    hit = min(max(cached_tokens, 0), input_tokens)
    exact = Decimal(input_tokens - hit) * inp + Decimal(hit) * cached + Decimal(output_tokens) * out
    assert price.base_tokens(input_tokens, output_tokens, cached_tokens) == math.ceil(exact)


@fuzz
@given(
    inp=multipliers,
    out=multipliers,
    a=st.tuples(counts, counts),
    b=st.tuples(counts, counts),
)
def test_base_tokens_is_monotone_in_both_token_counts(inp, out, a, b):
    price = Price("m", to_micro(inp), to_micro(out))
    low = (min(a[0], b[0]), min(a[1], b[1]))
    high = (max(a[0], b[0]), max(a[1], b[1]))
    assert price.base_tokens(*low) <= price.base_tokens(*high)


@fuzz
@given(value=st.decimals(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False))
def test_a_multiplier_in_micro_units_never_undercharges(value):
    with localcontext() as exact:  # 28 digits would round a tiny value's difference away
        exact.prec = 200
        assert Decimal(to_micro(value)) >= value * MICRO
        assert Decimal(to_micro(value)) - value * MICRO < 1


STAND_IN = ActualUsage(13, 7)


def _charged_as_reported_or_stood_in(actual: ActualUsage) -> None:
    assert 0 <= actual.input_tokens <= MAX_REPORTED_TOKENS
    assert 0 <= actual.output_tokens <= MAX_REPORTED_TOKENS
    assert 0 <= actual.cached_input_tokens <= actual.input_tokens
    assert all(isinstance(n, int) and not isinstance(n, bool) for n in vars(actual).values())


@fuzz
@given(usage=json_values)
def test_usage_from_any_json_never_raises_and_is_always_a_chargeable_integer(usage):
    _charged_as_reported_or_stood_in(ActualUsage.from_openai(usage, stand_in=STAND_IN))


@fuzz
@given(
    usage=st.fixed_dictionaries(
        {},
        optional={
            "prompt_tokens": json_values,
            "completion_tokens": json_values,
            "input_tokens": json_values,
            "output_tokens": json_values,
            "prompt_tokens_details": st.fixed_dictionaries(
                {}, optional={"cached_tokens": json_values}
            ),
        },
    )
)
def test_usage_with_any_values_in_openais_fields_is_charged_as_reported_or_stood_in(usage):
    actual = ActualUsage.from_openai(usage, stand_in=STAND_IN)
    _charged_as_reported_or_stood_in(actual)
    for field, names in (
        ("input_tokens", ("prompt_tokens", "input_tokens")),
        ("output_tokens", ("completion_tokens", "output_tokens")),
    ):
        reported = next((usage[name] for name in names if usage.get(name) is not None), None)
        count = token_count(reported)  # a bad count is the stand-in's, never 0
        assert getattr(actual, field) == (getattr(STAND_IN, field) if count is None else count)


@fuzz
@given(body=json_values)
def test_any_json_body_is_a_chat_request_or_an_invalid_request(body):
    try:
        ChatRequest.from_body(body)
    except InvalidRequest:
        pass


@fuzz
@given(
    body=st.fixed_dictionaries(
        {"model": st.sampled_from(MODELS), "messages": st.one_of(messages, json_values)},
        optional={
            "max_tokens": json_values,
            "max_completion_tokens": json_values,
            "n": json_values,
            "stream": json_values,
            "stream_options": json_values,
            "tools": json_values,
        },
    )
)
def test_a_plausible_body_is_parsed_or_refused_and_what_is_parsed_can_be_counted(body):
    try:
        request = ChatRequest.from_body(body)
    except InvalidRequest as exc:
        assert exc.status_code == 400
        return
    assert request.max_tokens is None or request.max_tokens >= 1
    lower, upper = prompt_bounds(request.messages, tools=request.tools)
    counted = count_messages(request.messages, request.model, tools=request.tools)
    assert lower <= counted <= upper


def test_non_finite_usage_numbers_are_replaced_by_the_stand_in():
    # Python's json reads Infinity and NaN; hypothesis once found int(inf) raising here.
    usage = ActualUsage.from_openai(
        {"prompt_tokens": float("inf"), "completion_tokens": float("nan")}, stand_in=STAND_IN
    )
    assert usage == STAND_IN
