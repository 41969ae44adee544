"""Write ``DaySnapshot`` rows: each active user's day counter, beside the month rows.
(A key's and a team's day are two columns of their month row instead: one row per
payer and month is all a run writes for them; see ``DAY_FIELDS``.)

One row per user and day, few per batch: the ORM's upsert is cheap enough here (the
month rows, many per user, have the raw SQL of ``snapshot_sql``). Values are absolute
and only the rows that differ are written, so a repeated run writes nothing.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from django.utils import timezone

from llm_quota.models import DaySnapshot

#: The day columns of the key and team month rows (``ApiKeyUsageSnapshot``,
#: ``TeamUsageSnapshot``): written by a run's current month only, so the month just
#: closed keeps its last day.
DAY_FIELDS = ("day", "day_base_tokens")


def day_date(day: str) -> date:
    """The date of a day id ``YYYYMMDD``."""
    return date(int(day[:4]), int(day[4:6]), int(day[6:8]))


def upsert_days(counters: dict[Any, int], day: date, *, using: str) -> int:
    """Store each user's (pk) base tokens of ``day``; the number of rows written."""
    if not counters:
        return 0
    stored = dict(
        DaySnapshot.objects.using(using)
        .filter(day=day, user_id__in=list(counters))
        .values_list("user_id", "base_tokens")
    )
    now = timezone.now()
    changed = [
        DaySnapshot(user_id=pk, day=day, base_tokens=value, updated_at=now)
        for pk, value in counters.items()
        if stored.get(pk) != value
    ]
    DaySnapshot.objects.using(using).bulk_create(
        changed,
        update_conflicts=True,
        unique_fields=["user", "day"],
        update_fields=["base_tokens", "updated_at"],
    )
    return len(changed)
