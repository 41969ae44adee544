"""Which upstream counts may be charged as reported (contract §5, ``rules.accounting``)."""

from __future__ import annotations

import pytest

from llm_quota.rules.accounting import (
    MAX_REPORTED_TOKENS,
    ActualUsage,
    ReportedUsage,
    fewest_tokens,
    token_count,
)


@pytest.mark.parametrize(
    "value, count",
    [
        (0, 0), (20, 20), (12.0, 12), (MAX_REPORTED_TOKENS, MAX_REPORTED_TOKENS),
        (-1, None), (2.5, None), (float("nan"), None), (float("inf"), None),
        (float("-inf"), None), (1e20, None), (10**20, None), (MAX_REPORTED_TOKENS + 1, None),
        ("20", None), (True, None), (None, None), ([20], None), ({"n": 20}, None),
    ],
)  # fmt: skip
def test_only_whole_non_negative_numbers_up_to_the_bound_are_token_counts(value, count):
    assert token_count(value) == count


def test_no_text_is_fewer_tokens_than_its_bytes_over_128():
    assert [fewest_tokens(n) for n in (0, 1, 128, 129, 79)] == [0, 1, 1, 2, 1]


def test_a_count_below_what_the_text_certainly_used_is_not_plausible():
    # A 20-token answer (79 bytes) reported as 0 output tokens; a 13-token prompt as 0.
    reported = ReportedUsage.read({"prompt_tokens": 0, "completion_tokens": 0})
    checked = reported.plausible(input_floor=fewest_tokens(13), output_floor=fewest_tokens(79))
    assert (checked.input_tokens, checked.output_tokens) == (None, None)
    assert checked.completed(13, 20) == ActualUsage(13, 20)
    # At the floor or above, the report stands.
    fine = ReportedUsage.read({"prompt_tokens": 1, "completion_tokens": 1})
    assert fine.plausible(input_floor=1, output_floor=1) == fine and fine.complete


def test_each_field_is_checked_on_its_own():
    reported = ReportedUsage.read(
        {
            "prompt_tokens": "11",
            "completion_tokens": 20,
            "prompt_tokens_details": {"cached_tokens": 5},
        }
    )
    assert (reported.input_tokens, reported.output_tokens) == (None, 20)
    assert reported.completed(13, 99) == ActualUsage(13, 20, 5)


def test_a_bad_cached_count_is_no_discount_and_never_above_the_prompt():
    bad = ReportedUsage.read({"prompt_tokens": 10, "completion_tokens": 1,
                              "prompt_tokens_details": {"cached_tokens": -4}})  # fmt: skip
    assert bad.completed(0, 0).cached_input_tokens == 0
    over = ReportedUsage.read({"prompt_tokens": 10, "completion_tokens": 1,
                               "prompt_tokens_details": {"cached_tokens": 50}})  # fmt: skip
    assert over.completed(0, 0).cached_input_tokens == 10


def test_our_own_actual_usage_is_checked_like_a_report():
    assert ReportedUsage.read(ActualUsage(10**20, 5)).input_tokens is None
    assert ReportedUsage.read(ActualUsage(10, 5, 3)) == ReportedUsage(10, 5, 3)


def test_sdk_usage_objects_are_read_by_attribute():
    from openai.types import CompletionUsage

    usage = CompletionUsage(prompt_tokens=4, completion_tokens=6, total_tokens=10)
    assert ReportedUsage.read(usage) == ReportedUsage(4, 6, 0)


def _reservation(estimate):
    from llm_quota.ledger.replies import Reservation

    return Reservation(
        "r1", "1", estimate.model, estimate.base_tokens, estimate.max_output_tokens,
        estimate, "d", "m", 0, False,
    )  # fmt: skip


def test_an_honest_prompt_count_below_a_bound_is_charged_as_reported():
    # A file part is bounded only by the context window: the estimate holds the whole
    # window, but only the counted text can say what the upstream certainly billed.
    from llm_quota.quota.admission import _estimate, usage_plan
    from llm_quota.quota.drivers import run
    from llm_quota.rules.accounting import Price
    from llm_quota.rules.estimation import PromptCount

    price = Price("gpt-4.1", 1_000_000, 4_000_000, context_window=1_047_576)
    estimate = _estimate(price, PromptCount(1_047_526, 40, unbounded=True), 50)
    assert estimate.prompt_tokens >= 1_047_526  # the window bounds it
    usage = {"prompt_tokens": 3000, "completion_tokens": 50}
    assert run(usage_plan(_reservation(estimate), usage, None)) == ActualUsage(3000, 50)
    # A prompt count below the counted text's floor is still no count.
    bad = {"prompt_tokens": 0, "completion_tokens": 50}
    assert run(usage_plan(_reservation(estimate), bad, None)).input_tokens == estimate.prompt_tokens
