"""The admin's budget bars: amber from the tier's soft limit, red once used up, the
percent rounded down, the figures in words for screen readers."""

from __future__ import annotations

import pytest

from llm_quota.reporting.bars import AMBER, GREEN, RED, usage_bar


@pytest.mark.parametrize(
    "used, color, shown",
    [(0, GREEN, 0), (799, GREEN, 79), (800, AMBER, 80), (996, AMBER, 99), (1000, RED, 100),
     (1500, RED, 150)],
)  # fmt: skip
def test_a_bar_turns_amber_at_the_soft_limit_and_red_when_used_up(used, color, shown):
    bar = usage_bar("This month", used, 1000, 80)
    assert f"background:{color}" in bar
    assert f"<span>{shown}%</span>" in bar
    assert f"width:{min(100, shown)}%" in bar  # never past its track
    assert f'aria-label="This month: {used:,} of 1,000 base tokens ({shown}%)"' in bar


def test_no_budget_shows_the_figure_alone_and_escapes_the_label():
    bar = usage_bar("<b>Today</b>", 12_345, None, 80)
    assert "12,345 · no limit" in bar and "role=" not in bar
    assert "&lt;b&gt;Today&lt;/b&gt;: 12,345 base tokens, no budget" in bar
