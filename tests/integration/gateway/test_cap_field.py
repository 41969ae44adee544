"""The output cap goes upstream under the field the model takes: ``max_completion_tokens``
for the o-series and gpt-5 (OpenAI refuses ``max_tokens`` there with a 400), and wherever
the caller used it; else ``max_tokens``. A price row may say which (``output_cap_field``).
Checked against the oracle upstream, which refuses ``max_tokens`` as OpenAI does."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from llm_quota.models import ModelPrice
from tests.integration.gateway.test_async_view import async_post
from tests.support import factories
from tests.support.gateway import MSGS, access_token

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def user(gateway):
    for model in ("o3", "gpt-5"):
        factories.price(model, "1", "4", default_max_output_tokens=300, context_window=200_000)
    factories.tier("free", is_default=True, tokens_per_month=100_000)
    return factories.user()


def post(user, **body):
    return Client().post(
        "/v1/chat/completions", json.dumps({"messages": MSGS, **body}),
        content_type="application/json", headers={"Authorization": f"Bearer {access_token(user)}"},
    )  # fmt: skip


def caps(sent: dict) -> dict:
    return {name: sent[name] for name in ("max_tokens", "max_completion_tokens") if name in sent}


@pytest.mark.parametrize("model", ["o3", "gpt-5"])
def test_a_reasoning_model_without_a_cap_gets_max_completion_tokens_only(oracle, user, model):
    response = post(user, model=model)
    assert response.status_code == 200, response.content
    sent, usage = oracle.bills[-1]
    assert caps(sent) == {"max_completion_tokens": 300}
    assert usage["completion_tokens"] == 300  # reasoning inside the cap
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 150


def test_a_max_tokens_sent_to_a_reasoning_model_is_moved_to_max_completion_tokens(oracle, user):
    response = post(user, model="o3", max_tokens=40)
    assert response.status_code == 200, response.content
    assert caps(oracle.bills[-1][0]) == {"max_completion_tokens": 40}


def test_other_models_keep_max_tokens_or_the_field_the_caller_used(oracle, user):
    assert post(user, model="gpt-4o").status_code == 200
    assert caps(oracle.bills[-1][0]) == {"max_tokens": 200}
    assert post(user, model="gpt-4o", max_completion_tokens=30).status_code == 200
    assert caps(oracle.bills[-1][0]) == {"max_completion_tokens": 30}


def test_the_price_row_says_which_field_caps_the_output(oracle, user):
    ModelPrice.objects.filter(model="gpt-4o").update(output_cap_field="max_completion_tokens")
    assert post(user, model="gpt-4o", max_tokens=25).status_code == 200
    assert caps(oracle.bills[-1][0]) == {"max_completion_tokens": 25}


def test_the_async_view_sends_the_same_field(oracle, user):
    headers = {"Authorization": f"Bearer {access_token(user)}"}
    response = async_post({"model": "o3", "messages": MSGS}, headers)
    assert response.status_code == 200, response.body
    assert caps(oracle.bills[-1][0]) == {"max_completion_tokens": 300}
