"""Where Redis' counters come back from after Redis lost them: the snapshots.

The ledger asks once per user per loss (the ``seen`` marker in ``lua/restore.lua``).
What the last snapshot did not hold (at most one ``SNAPSHOT_INTERVAL`` of usage, and
the current day's counter) cannot be restored; the admin shows each snapshot's age.
"""

from __future__ import annotations

from llm_quota.ledger.replies import ModelUsage
from llm_quota.rules.periods import first_day


def month_from_snapshots(user_id: str, month: str) -> tuple[int, list[ModelUsage]]:
    from llm_quota.models import UsageSnapshot

    period = first_day(month)
    rows = [
        ModelUsage(
            model=row.model,
            requests=row.requests,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            base_tokens=row.base_tokens,
        )
        for row in UsageSnapshot.objects.filter(user_id=user_id, period=period)
    ]
    return sum(row.base_tokens for row in rows), rows


def key_months_from_snapshots(user_id: str, month: str) -> list[tuple[int, ModelUsage]]:
    """The month of each of the user's API keys (``ApiKeyUsageSnapshot``): a key's
    budget must not start again from zero because Redis lost its counters."""
    from llm_quota.models import ApiKeyUsageSnapshot

    rows = ApiKeyUsageSnapshot.objects.filter(api_key__user_id=user_id, period=first_day(month))
    return [
        (
            row.api_key_id,
            ModelUsage(
                model="",
                requests=row.requests,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                base_tokens=row.base_tokens,
            ),
        )
        for row in rows
    ]
