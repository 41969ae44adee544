"""Base tokens (input and output at their multipliers, rounded up) and which price row applies."""

from __future__ import annotations

from decimal import Decimal

import pytest

from llm_quota.exceptions import ModelNotAllowed, UnknownModel
from llm_quota.rules.accounting import ActualUsage, Price, to_micro
from llm_quota.rules.pricing import price_for
from tests.support import factories


def test_base_tokens_round_up_with_decimal_multipliers():
    p = Price("m", to_micro(Decimal("0.15")), to_micro(Decimal("0.6")))
    assert p.base_tokens(1, 0) == 1  # 0.15 -> 1
    assert p.base_tokens(10, 1) == 3  # 1.5 + 0.6 = 2.1 -> 3
    assert p.base_tokens(20, 0) == 3  # exactly 3.0 stays 3
    assert p.base_tokens(0, 0) == 0


def test_cached_input_has_its_own_rate():
    p = Price("m", to_micro("1"), to_micro("4"), cached_input_micro=to_micro("0.25"))
    assert p.base_tokens(1000, 10, cached_input_tokens=800) == 200 + 200 + 40


def test_micro_conversion_rounds_up_extra_decimals():
    assert to_micro(Decimal("0.0000001")) == 1
    with pytest.raises(ValueError):
        to_micro(Decimal("-1"))


def test_openai_usage_shapes():
    stand_in = ActualUsage(13, 21)
    assert ActualUsage.from_openai(
        {"prompt_tokens": 5, "completion_tokens": 7}, stand_in=stand_in
    ) == ActualUsage(5, 7)
    assert ActualUsage.from_openai(
        {"input_tokens": 5, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 2}},
        stand_in=stand_in,
    ) == ActualUsage(5, 7, 2)
    # What is missing or not a count is the stand-in's, never 0.
    assert ActualUsage.from_openai(None, stand_in=stand_in) == stand_in
    assert ActualUsage.from_openai(
        {"prompt_tokens": -3, "completion_tokens": "x"}, stand_in=stand_in
    ) == stand_in


@pytest.mark.django_db
def test_exact_name_beats_patterns_and_specific_pattern_beats_general(settings):
    factories.price("gpt-4o", "1", "4")
    factories.price("gpt-4o*", "2", "8")
    factories.price("gpt-4o-mini*", "0.06", "0.24")
    factories.price("*", "9", "9")
    assert price_for("gpt-4o").input_micro == 1_000_000
    assert price_for("gpt-4o-2024-08-06").input_micro == 2_000_000
    assert price_for("gpt-4o-mini-2024").input_micro == 60_000
    assert price_for("gpt-4o-2024-08-06").model == "gpt-4o-2024-08-06"
    # Which row priced it: usage past MODEL_NAMES_PER_MONTH names is recorded there.
    assert price_for("gpt-4o").pattern is None
    assert price_for("gpt-4o-2024-08-06").pattern == "gpt-4o*"
    assert price_for("gpt-4o-mini-2024").pattern == "gpt-4o-mini*"


@pytest.mark.django_db
def test_unknown_model_policy(settings):
    factories.price("*", "9", "9")
    with pytest.raises(UnknownModel):
        price_for("mystery")
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UNKNOWN_MODEL": "default"}
    assert price_for("mystery").input_micro == 9_000_000
    assert price_for("mystery").pattern == "*"


@pytest.mark.django_db
def test_disabled_model_is_not_allowed():
    factories.price("old-model", "1", "1", enabled=False)
    with pytest.raises(ModelNotAllowed):
        price_for("old-model")


@pytest.mark.django_db
def test_a_pattern_is_matched_once_per_name_until_a_price_changes(monkeypatch):
    import fnmatch

    from llm_quota.rules import pricing

    factories.price("gpt-4o*", "2", "8")
    factories.price("gpt-4o-mini*", "0.06", "0.24")
    calls: list[tuple[str, str]] = []
    real = fnmatch.fnmatchcase
    monkeypatch.setattr(pricing.fnmatch, "fnmatchcase",
                        lambda name, pat: calls.append((name, pat)) or real(name, pat))  # fmt: skip
    assert price_for("gpt-4o-mini-2024").model == "gpt-4o-mini-2024"
    matched = len(calls)
    for _ in range(5):
        assert price_for("gpt-4o-mini-2024").input_micro == 60_000
        with pytest.raises(UnknownModel):
            price_for("mystery")
    assert len(calls) == matched + 2  # "mystery" once against both patterns, then memoized
    factories.price("gpt-4o-mini-2024", "1", "1")  # a save drops the memo with the rows
    assert price_for("gpt-4o-mini-2024").input_micro == 1_000_000


@pytest.mark.django_db
def test_the_resolved_names_memo_is_bounded(monkeypatch):
    from llm_quota.rules import pricing

    monkeypatch.setattr(pricing, "MAX_RESOLVED", 8)
    factories.price("m-*", "1", "1")
    for n in range(30):
        assert price_for(f"m-{n}").model == f"m-{n}"
    rows = pricing.config_cache.get("prices", pricing._price_rows)
    assert 0 < len(rows.resolved) <= 8
