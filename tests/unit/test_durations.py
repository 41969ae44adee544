"""Waits as a person reads them, in refusal messages and the admin alike: the
smallest unit shown rounds up, so waiting what the text says is never too early."""

from __future__ import annotations

import pytest

from llm_quota.durations import human_duration
from llm_quota.exceptions import BudgetExceeded, RateLimited


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0 seconds"),
        (-5, "0 seconds"),
        (0.2, "1 second"),
        (59, "59 seconds"),
        (60, "1 minute"),
        (61, "1 minute, 1 second"),
        (7500, "2 hours, 5 minutes"),
        (7501, "2 hours, 6 minutes"),  # up, not down: 2 h 5 min would be a second early
        (3599.5, "1 hour"),  # rounding up carries into the larger unit
        (86_390, "1 day"),
        (97_143, "1 day, 3 hours"),
        (31 * 86_400, "31 days"),
    ],
)
def test_durations_read_in_two_units_rounded_up(seconds, text):
    assert human_duration(seconds) == text


def test_a_refusal_says_when_to_retry_in_words_and_keeps_the_seconds_as_numbers():
    refusal = BudgetExceeded("tokens_per_day", 40470, upgrade={"tier": "pro", "url": ""})
    assert str(refusal) == (
        "Limit 'tokens_per_day' reached. Retry after 11 hours, 15 minutes. "
        "Upgrade to the 'pro' tier for more."
    )
    assert refusal.retry_after == 40470 and refusal.wait == 40470
    assert refusal.detail["retry_after"] == 40470  # the body's figure stays numeric
    assert str(RateLimited("requests_per_minute", 1)).endswith("Retry after 1 second.")
