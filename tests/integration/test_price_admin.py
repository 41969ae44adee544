"""Prices in the admin are entered in USD per million tokens, as providers publish
them; the form turns them into the stored multipliers (base tokens per token)
exactly, in Decimals, and the multiplier stays editable under "Advanced"."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from llm_quota.forms import ModelPriceForm, usd_per_million
from llm_quota.models import ModelPrice
from tests.support import factories

pytestmark = pytest.mark.django_db

BASE = {"default_max_output_tokens": "100", "enabled": "on", "encoding": ""}


def test_a_price_entered_in_usd_is_stored_as_its_multiplier(admin_client):
    add = reverse("admin:llm_quota_modelprice_add")
    response = admin_client.post(
        add,
        {**BASE, "model": "gpt-4o-mini", "input_usd": "0.15", "output_usd": "0.60",
         "cached_input_usd": "0.075", "input_multiplier": "1", "output_multiplier": "1"},
    )  # fmt: skip
    assert response.status_code == 302, response.content.decode()[:3000]
    price = ModelPrice.objects.get(model="gpt-4o-mini")
    # At the default $2.50 per million base tokens:
    assert price.input_multiplier == Decimal("0.06")
    assert price.output_multiplier == Decimal("0.24")
    assert price.cached_input_multiplier == Decimal("0.03")
    page = admin_client.get(reverse("admin:llm_quota_modelprice_change", args=[price.pk]))
    text = page.content.decode()
    assert 'name="input_usd" value="0.15"' in text and 'name="output_usd" value="0.6"' in text
    assert 'name="cached_input_usd" value="0.075"' in text


@pytest.mark.parametrize("usd", ["0.15", "0.6", "2.5", "10", "15", "75", "0.0000025", "123.45678"])
def test_usd_to_multiplier_and_back_is_exact(usd):
    form = ModelPriceForm(
        data={**BASE, "model": "m", "input_usd": usd, "output_usd": usd,
              "input_multiplier": "1", "output_multiplier": "1"},
    )  # fmt: skip
    assert form.is_valid(), form.errors
    stored = form.cleaned_data["input_multiplier"]
    assert usd_per_million(stored) == Decimal(usd)
    assert stored * Decimal("2.50") == Decimal(usd)  # no float anywhere on the way


def test_a_price_that_does_not_divide_exactly_rounds_up_never_under_charging(settings):
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "BASE_TOKEN_USD_PER_MILLION": Decimal("3")}
    form = ModelPriceForm(
        data={**BASE, "model": "m", "input_usd": "1", "output_usd": "3",
              "input_multiplier": "1", "output_multiplier": "1"},
    )  # fmt: skip
    assert form.is_valid(), form.errors
    assert form.cleaned_data["input_multiplier"] == Decimal("0.333334")
    assert form.cleaned_data["output_multiplier"] == Decimal("1")


def test_the_multiplier_stays_editable_when_the_usd_price_is_left_alone(admin_client):
    price = factories.price("gpt-4o", "1", "4")
    url = reverse("admin:llm_quota_modelprice_change", args=[price.pk])
    response = admin_client.post(
        url,
        {**BASE, "model": "gpt-4o", "input_usd": "2.5", "output_usd": "10",
         "input_multiplier": "1", "output_multiplier": "5"},
    )  # fmt: skip
    assert response.status_code == 302
    price.refresh_from_db()
    assert (price.input_multiplier, price.output_multiplier) == (Decimal("1"), Decimal("5"))


def test_a_usd_price_and_a_multiplier_that_disagree_are_refused(admin_client):
    price = factories.price("gpt-4o", "1", "4")
    url = reverse("admin:llm_quota_modelprice_change", args=[price.pk])
    response = admin_client.post(
        url,
        {**BASE, "model": "gpt-4o", "input_usd": "2.5", "output_usd": "20",
         "input_multiplier": "1", "output_multiplier": "5"},
    )  # fmt: skip
    assert response.status_code == 200
    assert "disagree" in response.content.decode()
    price.refresh_from_db()
    assert price.output_multiplier == Decimal("4")


@pytest.mark.parametrize("usd, message", [("-1", "greater than or equal to 0"),
                                          ("abc", "Enter a number"),
                                          ("99999999999", "too large")])  # fmt: skip
def test_bad_usd_prices_get_a_clear_error(admin_client, usd, message):
    response = admin_client.post(
        reverse("admin:llm_quota_modelprice_add"),
        {**BASE, "model": "m", "input_usd": usd, "input_multiplier": "1",
         "output_multiplier": "1"},
    )  # fmt: skip
    assert response.status_code == 200 and message in response.content.decode()
    assert not ModelPrice.objects.exists()


def test_the_form_explains_the_base_token_once_and_tucks_the_multipliers_away(admin_client):
    text = admin_client.get(reverse("admin:llm_quota_modelprice_add")).content.decode()
    assert text.count("A base token is the unit every budget counts in") == 1
    assert "USD per 1M tokens" in text
    assert "<details" in text and "Advanced" in text  # collapsed, no JS needed
    assert "Empty: cached input tokens cost the input price." in text
