"""Which field caps a model's output upstream: the price row's say, else the model's name."""

from __future__ import annotations

import pytest

from llm_quota.shapes.chat import ChatRequest, cap_field_for

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("model", "configured", "field"),
    [("o1", "", "max_completion_tokens"), ("o3-mini", "", "max_completion_tokens"),
     ("o4-mini-2025-04-16", "", "max_completion_tokens"), ("gpt-5", "", "max_completion_tokens"),
     ("gpt-5.4-nano", "", "max_completion_tokens"), ("openai/o3", "", "max_completion_tokens"),
     ("ft:o4-mini:acme::abc", "", "max_completion_tokens"), ("gpt-4o", "", "max_tokens"),
     ("gpt-4.1", "", "max_tokens"), ("omni-model", "", "max_tokens"),
     ("o3", "max_tokens", "max_tokens"), ("llama-3", "max_completion_tokens",
                                           "max_completion_tokens")],
)  # fmt: skip
def test_the_cap_field_is_chosen_by_the_row_then_by_the_name(model, configured, field):
    assert cap_field_for(model, configured) == field


def test_the_upstream_body_carries_the_cap_under_that_field_only():
    chat = ChatRequest.from_body({"model": "o3", "messages": MSGS, "max_tokens": 50})
    body = chat.upstream_body(20)
    assert "max_tokens" not in body and body["max_completion_tokens"] == 20
    both = ChatRequest.from_body(
        {"model": "gpt-4o", "messages": MSGS, "max_tokens": 50, "max_completion_tokens": 60}
    )
    assert both.upstream_body(20) == {**both.body, "max_tokens": 20, "max_completion_tokens": 20}
    assert both.upstream_body(20, "max_completion_tokens") == {
        "model": "gpt-4o", "messages": MSGS, "max_completion_tokens": 20,
    }  # fmt: skip
