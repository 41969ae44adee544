"""Billed <= reserved, for requests built at random from every billed field (hypothesis),
on a real Redis: each is admitted as the gateway admits it, sent as the gateway sends it,
billed by the oracle (``llm_quota.testing.billing``, OpenAI's rules written apart from the
estimator), then settled. No bill may pass its reservation, and the settled month never
passes the budget."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm_quota.exceptions import BudgetExceeded, InvalidRequest, RateLimited
from llm_quota.gateway.chat_call import ChatCall
from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.chat import ChatRequest
from llm_quota.testing import billing
from tests.support import factories, media

pytestmark = pytest.mark.django_db

#: Each family of the vision guide, and a model it does not list.
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini",
          "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4o-2024-08-06", "mystery-model"]  # fmt: skip
REMOTE = {f"https://images.test/{n}.png": size for n, size in enumerate(
    [(64, 64), (1024, 1024), (768, 2048), (4000, 3000), (513, 513), (2049, 513)])}  # fmt: skip
FILES = {"file-small": media.pdf(1), "file-book": media.pdf(12, "chapter " * 400)}

texts = st.text(max_size=200)
names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)
sizes = st.tuples(st.integers(1, 5000), st.integers(1, 5000))
details = st.sampled_from([None, "auto", "low", "high"])


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["png", "jpeg", "gif", "webp", "VP8L", "VP8X", "remote"]))
    if kind == "remote":
        return media.image_part(draw(st.sampled_from(sorted(REMOTE))), draw(details))
    width, height = draw(sizes)
    if kind in ("webp", "VP8L", "VP8X"):
        width, height = min(width, 16383), min(height, 16383)
        data = media.webp(width, height, "VP8 " if kind == "webp" else kind)
    else:
        data = {"png": media.png, "gif": media.gif}.get(kind, media.jpeg)(width, height)
    return media.image_part(media.data_url(data, f"image/{kind}"), draw(details))


@st.composite
def audio(draw):
    seconds = draw(st.floats(0.1, 30))
    if draw(st.booleans()):
        rate = draw(st.sampled_from([8_000, 16_000, 24_000]))
        return media.audio_part(media.wav(seconds, rate), "wav")
    return media.audio_part(media.mp3(seconds, draw(st.sampled_from([8, 16, 64, 128]))), "mp3")


files = st.one_of(
    st.sampled_from(sorted(FILES)).map(lambda name: media.file_part(file_id=name)),
    st.integers(1, 4).map(lambda pages: media.file_part(media.pdf(pages))),
)
parts = st.one_of(
    texts.map(lambda text: {"type": "text", "text": text}), images(), audio(), files
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "developer", "assistant"]), "content": texts},
            optional={"name": names},
        ),
        st.fixed_dictionaries({"role": st.just("user"),
                               "content": st.one_of(texts, st.lists(parts, max_size=4))}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                               "tool_calls": st.lists(st.fixed_dictionaries({
                                   "id": names, "type": st.just("function"),
                                   "function": st.fixed_dictionaries(
                                       {"name": names, "arguments": texts})}), max_size=2)}),
        st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": names,
                               "content": texts}),
    ),  # fmt: skip
    min_size=1,
    max_size=5,
)
schemas = st.recursive(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["string", "integer", "number", "boolean", "null"])},
        optional={"description": texts, "enum": st.lists(texts, min_size=1, max_size=5)},
    ),
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(names, inner, max_size=5)},
            optional={"description": texts, "required": st.lists(names, max_size=3)},
        ),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                              optional={"description": texts}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)}),
    ),  # fmt: skip
    max_leaves=12,
)
functions = st.fixed_dictionaries(
    {"name": names},
    optional={
        "description": texts,
        "parameters": st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.dictionaries(names, schemas, max_size=5)},
            optional={"required": st.lists(names, max_size=3)},
        ),
    },
)
response_formats = st.one_of(
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.builds(
        lambda name, schema, strict: {"type": "json_schema",
                                      "json_schema": {"name": name, "schema": schema,
                                                      "strict": strict}},
        names, schemas, st.booleans(),
    ),  # fmt: skip
)
tool_choices = st.one_of(
    st.sampled_from(["auto", "none", "required"]),
    names.map(lambda name: {"type": "function", "function": {"name": name}}),
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "messages": messages},
    optional={
        "tools": st.lists(functions.map(lambda f: {"type": "function", "function": f}),
                          max_size=4),
        "functions": st.lists(functions, min_size=1, max_size=3),
        "tool_choice": tool_choices,
        "response_format": response_formats,
        "n": st.integers(1, 3),
        "max_tokens": st.integers(1, 400),
        "max_completion_tokens": st.integers(1, 400),
    },
)  # fmt: skip


@pytest.fixture
def prices(ledger):
    for model in MODELS:
        window = billing.CONTEXT_WINDOWS.get(billing.family(model), 128_000)
        factories.price(model, "0.5", "2", default_max_output_tokens=300, context_window=window)


def call(user, body: dict, oracle: billing.Media) -> int:
    """One call, as the gateway makes it: admitted, sent with the reserved cap, billed by
    the oracle, settled. Returns what the upstream billed (0 when nothing ran)."""
    chat = ChatRequest.from_body(body)
    try:
        guard = QuotaGuard(user, **chat.quota_kwargs()).admit()
    except (InvalidRequest, BudgetExceeded, RateLimited) as refused:
        event(f"refused: {type(refused).__name__}")
        return 0  # refused before the call: nothing billed, nothing held
    sent = ChatCall(chat, guard, user).upstream_body()
    try:
        bill = billing.bill(sent, oracle)
    except billing.Refused as refused:
        event(f"upstream refused: {refused.code}")
        guard.release()  # the upstream refused: nothing billed
        return 0
    event("billed")
    billed = guard.estimate.price.base_tokens(bill.prompt_tokens, bill.completion_tokens)
    assert billed <= guard.reservation.reserved, (bill, guard.estimate)
    guard.settle(bill.usage())
    return billed


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)  # fmt: skip
@given(requests=st.lists(bodies, min_size=1, max_size=3), budget=st.integers(500, 400_000))
def test_no_bill_passes_its_reservation_and_the_month_never_passes_the_budget(
    prices, ledger, requests, budget
):
    oracle = billing.Media(images=dict(REMOTE), files=dict(FILES))
    user = factories.user(factories.tier(tokens_per_month=budget))
    charged = sum(call(user, body, oracle) for body in requests)
    live = ledger.usage(user.pk)
    assert live.tokens_this_month == charged <= budget
    assert live.reserved == 0
