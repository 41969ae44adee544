"""Key parts and model names are checked whole: ``$`` would let a trailing newline by."""

from __future__ import annotations

import pytest

from llm_quota.forms import validate_model_pattern
from llm_quota.ledger import keys


@pytest.mark.parametrize(
    "build, value",
    [
        (keys.user_id, "42\n"),
        (keys.prefix, "llmq\n"),
        (keys.reservation_id, "0" * 32 + "\n"),
        (keys.model_name, "claude-haiku-4-5-2\n"),
        (lambda part: keys.KeySpace().alert_sent(1, part, 80, "202611"), "tokens_per_month\n"),
        (lambda part: keys.KeySpace().alert_sent(1, "tokens_per_month", 80, part), "202611\n"),
    ],
)
def test_a_trailing_newline_never_passes_a_key_part_check(build, value):
    build(value.rstrip("\n"))  # the same part without it is fine
    with pytest.raises(keys.InvalidKeyPart):
        build(value)


def test_a_model_name_with_a_trailing_newline_is_not_a_model_name():
    assert keys.is_valid_model_name("claude-haiku-4-5-2")
    assert not keys.is_valid_model_name("claude-haiku-4-5-2\n")


def test_a_price_pattern_with_a_trailing_newline_is_refused():
    from django import forms

    validate_model_pattern("claude-haiku-4-5-2*")
    with pytest.raises(forms.ValidationError):
        validate_model_pattern("claude-haiku-4-5-2*\n")


def test_a_model_field_is_a_model_name_or_a_price_pattern():
    for field in ("gpt-4o", "claude-sonnet-4-5-2*", "*", "gpt-4o-2024-08-0[56]"):
        assert keys.model_field(field) == field
    for bad in ("gpt-4o\n", "a|b", "", "x" * 129, None):
        with pytest.raises(keys.InvalidKeyPart):
            keys.model_field(bad)
