"""Settle a call from what its answer says it used (``shapes.base.Used``).

Which of the two the answer supports is decided by the shape (``Used.usage`` when the
upstream reported one, else the generated text); a reported usage goes with the text,
which stands in for an output count the upstream got wrong. These only make the call,
sync or async, and do nothing for a guard already finished.
"""

from __future__ import annotations

from llm_quota.quota.guard import QuotaGuard
from llm_quota.shapes.base import Used


def settle(guard: QuotaGuard, used: Used) -> None:
    if guard.finished:
        return
    if used.usage is not None:
        guard.settle(used.usage, output_text=used.text)
    else:
        guard.settle_output(used.text)


async def asettle(guard: QuotaGuard, used: Used) -> None:
    if guard.finished:
        return
    if used.usage is not None:
        await guard.asettle(used.usage, output_text=used.text)
    else:
        await guard.asettle_output(used.text)
