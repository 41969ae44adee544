"""Where Redis' counters come back from after Redis lost them: the snapshots.

The ledger asks once per user per loss (the ``seen`` marker in ``lua/restore.lua``),
and once per loss for the global caps (``lua/global_restore.lua``). What the last
snapshot did not hold (at most one ``SNAPSHOT_INTERVAL`` of usage) cannot be
restored; the admin shows each snapshot's age.
"""

from __future__ import annotations

from typing import NamedTuple

from llm_quota.ledger.replies import KeyMonth, ModelUsage
from llm_quota.rules.periods import add_months, day_id, first_day

#: The user id that asks for everyone's usage together: the global caps' counters.
EVERYONE = ""


class Restored(NamedTuple):
    """A month from the database: its base tokens and per-model rows, and the latest
    day of it the snapshots hold (``day`` ``""``: none) with that day's base tokens.
    A restore source may return only the first two (``(total, rows)``)."""

    base_tokens: int
    rows: list[ModelUsage]
    day: str = ""
    day_base_tokens: int = 0


def month_from_snapshots(user_id: str, month: str) -> Restored:
    """A user's ``month`` from ``UsageSnapshot`` and its last ``DaySnapshot``; with
    ``EVERYONE``, all users' totals summed (the global caps)."""
    from django.db.models import Sum

    from llm_quota.models import DaySnapshot, UsageSnapshot

    period = first_day(month)
    months = UsageSnapshot.objects.filter(period=period)
    days = DaySnapshot.objects.filter(day__gte=period, day__lt=add_months(period, 1))
    if user_id == EVERYONE:
        total = months.aggregate(n=Sum("base_tokens"))["n"] or 0
        last = days.order_by("-day").values_list("day", flat=True).first()
        if last is None:
            return Restored(total, [])
        day_total = days.filter(day=last).aggregate(n=Sum("base_tokens"))["n"] or 0
        return Restored(total, [], day_id(last), day_total)
    rows = [
        ModelUsage(
            model=row.model,
            requests=row.requests,
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            base_tokens=row.base_tokens,
        )
        for row in months.filter(user_id=user_id)
    ]
    day = days.filter(user_id=user_id).order_by("-day").first()
    return Restored(
        sum(row.base_tokens for row in rows),
        rows,
        day_id(day.day) if day else "",
        day.base_tokens if day else 0,
    )


def key_months_from_snapshots(user_id: str, month: str) -> list[tuple[int, KeyMonth]]:
    """The month of each of the user's API keys (``ApiKeyUsageSnapshot``), with its
    latest copied day: a key's budgets must not start again from zero because Redis
    lost its counters."""
    from llm_quota.models import ApiKeyUsageSnapshot

    rows = ApiKeyUsageSnapshot.objects.filter(api_key__user_id=user_id, period=first_day(month))
    return [
        (
            row.api_key_id,
            KeyMonth(
                requests=row.requests,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                base_tokens=row.base_tokens,
                day=day_id(row.day),
                day_base_tokens=row.day_base_tokens,
            ),
        )
        for row in rows
    ]
