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
from llm_quota.gateway.call import GatedCall
from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.chat import ChatRequest
from llm_quota.testing import billing
from tests.support import factories
from tests.support.billed_requests import FILES, MODELS, REMOTE, bodies

pytestmark = pytest.mark.django_db


@pytest.fixture
def prices(ledger):
    for model in MODELS:
        window = billing.CONTEXT_WINDOWS.get(billing.family(model), billing.DEFAULT_CONTEXT_WINDOW)
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
    sent = GatedCall(chat, guard, user).upstream_body()
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
