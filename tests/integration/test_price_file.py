"""Prices from public USD rates, the loader command, the demo seed and the runaway replay."""

from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from llm_quota.ledger.default import get_ledger
from llm_quota.management import price_file
from llm_quota.models import ModelPrice, UserQuota

BASE = Decimal("2.50")


def test_multiplier_is_usd_over_the_base_token_price_rounded_up():
    assert price_file.multiplier(Decimal("2.50"), BASE) == Decimal("1")
    assert price_file.multiplier(Decimal("10"), BASE) == Decimal("4")
    assert price_file.multiplier(Decimal("0.15"), BASE) == Decimal("0.06")
    # 1/3 of a base token per token: rounded up at the sixth place, never down.
    assert price_file.multiplier(Decimal("2.50") / 3, BASE) == Decimal("0.333334")


def test_bundled_prices_derive_from_their_public_usd_rates():
    rows = {row.model: row for row in price_file.read(price_file.BUNDLED, BASE)}
    assert rows["gpt-4o"].input_multiplier == 1 and rows["gpt-4o"].output_multiplier == 4
    assert rows["gpt-4o"].cached_input_multiplier == Decimal("0.5")
    assert rows["claude-sonnet-4-5"].output_multiplier == 6  # $15 / $2.50
    assert {"openai", "anthropic"} <= {
        entry["provider"] for entry in json.loads(price_file.BUNDLED.read_text())["models"]
    }


def test_bundled_reasoning_models_are_capped_by_max_completion_tokens():
    rows = {row.model: row for row in price_file.read(price_file.BUNDLED, BASE)}
    reasoning = [name for name in rows if name.startswith(("o1", "o3", "o4", "gpt-5"))]
    assert {"o1", "o3", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano"} <= set(reasoning)
    assert {rows[name].output_cap_field for name in reasoning} == {"max_completion_tokens"}
    assert rows["gpt-4o"].output_cap_field == ""  # by the model's name


@pytest.mark.django_db
def test_the_cap_field_is_loaded_into_the_price_row(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": [{"model": "my-o3", "input": "2", "output": "8",
                                            "output_cap_field": "max_completion_tokens"}]}))
    call_command("llm_quota_load_prices", str(path), stdout=StringIO(), stderr=StringIO())
    assert ModelPrice.objects.get(model="my-o3").output_cap_field == "max_completion_tokens"


@pytest.mark.parametrize(
    "data, message",
    [({"models": [{"model": "m", "input": "1"}]}, "both an input and an output"),
     ({"models": [{"model": "m", "input": "x", "output": "1"}]}, "not a number"),
     ({"models": [{"model": "m", "input": "-1", "output": "1"}]}, "non-negative"),
     ({"models": [{"model": "bad name", "input": "1", "output": "1"}]}, "not a valid model"),
     ({"models": [{"model": "m", "input": "1", "output": "1"}] * 2}, "appears twice"),
     ({"models": {}}, "expected"),
     ({"models": [{"model": "m", "input": "1", "output": "1", "output_cap_field": "n"}]},
      "'output_cap_field' must be max_tokens or max_completion_tokens")],
)  # fmt: skip
def test_bad_price_files_say_what_is_wrong(data, message):
    with pytest.raises(price_file.PriceFileError, match=message):
        price_file.parse(data, BASE)


@pytest.mark.django_db
def test_load_command_creates_then_updates_then_leaves_alone(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": [
        {"model": "gpt-x", "input": "5", "output": "20", "context_window": 1000},
        {"model": "house-model", "input_multiplier": "0.5", "output_multiplier": "2"},
    ]}))  # fmt: skip
    out = StringIO()
    call_command("llm_quota_load_prices", str(path), stdout=out, stderr=StringIO())
    assert "2 created" in out.getvalue()
    row = ModelPrice.objects.get(model="gpt-x")
    assert (row.input_multiplier, row.output_multiplier, row.context_window) == (2, 8, 1000)
    assert ModelPrice.objects.get(model="house-model").output_multiplier == 2
    path.write_text(path.read_text().replace('"20"', '"25"'))
    out = StringIO()
    call_command("llm_quota_load_prices", str(path), stdout=out, stderr=StringIO())
    assert "0 created, 1 updated, 1 unchanged" in out.getvalue()
    assert ModelPrice.objects.get(model="gpt-x").output_multiplier == 10
    with pytest.raises(CommandError, match="cannot read"):
        call_command("llm_quota_load_prices", str(tmp_path / "missing.json"))


@pytest.mark.django_db(transaction=True)
def test_demo_seed_then_the_runaway_loop_is_stopped_at_its_budget():
    call_command("demo_seed", stdout=StringIO(), stderr=StringIO())
    User = get_user_model()
    assert UserQuota.objects.get(user__username="alice").tier.name == "free"
    assert UserQuota.objects.get(user__username="bob").tier.name == "pro"
    assert User.objects.get(username="bob").check_password("bob")
    assert ModelPrice.objects.filter(model__startswith="claude-").exists()
    out = StringIO()
    call_command("llm_quota_runaway", budget=3000, username="worker", stdout=out,
                 stderr=StringIO())  # fmt: skip
    report = out.getvalue()
    assert "Stopped by the gate: HTTP 429 insufficient_quota (limit tokens_per_day)" in report
    assert "x-should-retry: false" in report
    worker = User.objects.get(username="worker")
    usage = get_ledger().usage(worker.pk)
    assert 0 < usage.tokens_today <= 3000 and usage.reserved == 0
    assert f"Spent {usage.tokens_today:,} of a 3,000 base-token budget" in report
