"""A budget's use as a small bar, for the admin's lists and pages.

HTML and inline CSS only (no JavaScript, no stylesheet to ship), in the charts'
Okabe-Ito colours, with its figures in words for screen readers (``aria-label``)
and a tooltip. Percent is rounded down, here and in the usage report: 99.6% reads
99% while the user can still spend, and 100% means refused.
"""

from __future__ import annotations

from django.utils.html import format_html
from django.utils.safestring import SafeString

from llm_quota.reporting.charts import PALETTE

GREEN, AMBER, RED = PALETTE[2], PALETTE[1], PALETTE[5]


def whole_percent(used: int, budget: int) -> int:
    """``used`` as a whole percent of ``budget``, rounded down."""
    return 100 * used // budget


def usage_bar(label: str, used: int, budget: int | None, soft_percent: int) -> SafeString:
    """``used`` base tokens against ``budget`` (None: no budget, the figure alone);
    amber from the tier's soft limit, red once the budget is used up."""
    if budget is None:
        words = f"{label}: {used:,} base tokens, no budget"
        return format_html(
            '<span class="llmq-bar llmq-unlimited" title="{}" style="white-space:nowrap">'
            "{} · no limit</span>",
            words, f"{used:,}",
        )  # fmt: skip
    percent = whole_percent(used, budget)
    color = RED if used >= budget else AMBER if 100 * used >= budget * soft_percent else GREEN
    words = f"{label}: {used:,} of {budget:,} base tokens ({percent}%)"
    return format_html(
        '<span class="llmq-bar" role="img" aria-label="{}" title="{}" style="display:inline-flex;'
        'align-items:center;gap:6px;white-space:nowrap">'
        '<span style="display:inline-block;width:64px;height:8px;border-radius:4px;'
        'overflow:hidden;background:rgba(127,127,127,.25)">'
        '<span style="display:block;height:100%;width:{}%;background:{}"></span></span>'
        "<span>{}%</span></span>",
        words, words, min(100, percent), color, percent,
    )  # fmt: skip
