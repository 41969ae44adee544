"""Raise the payers besides the user, API keys, teams and the global caps, where Redis
is behind the database: part of every snapshot run, as ``snapshot._catch_up`` is for
users.

A promoted replica, or a Redis restarted from an old file, is not empty, so nothing is
restored: its counters are simply lower than what the last runs copied. Settled usage
only grows within a generation (a key's or a team's reset starts a new one,
``share_reset.lua``), so a stored figure above Redis' in the same generation is a write
Redis lost: ``payer_raise.lua`` takes each field to max(Redis, database) and adds the
total's lift to the month's and today's counters, and the database keeps the higher
figures. In another generation the reset stands. Nothing resets the global counters,
so they are raised to everyone's snapshot figures summed (``global_raise.lua``).
The decisions are plain functions of what the run read; only the raise is a script.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from django.db.models import Sum

from llm_quota.conf import quota_settings
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import DaySnapshot, UsageSnapshot
from llm_quota.reporting.snapshot_days import day_date
from llm_quota.reporting.snapshot_sql import database
from llm_quota.rules.periods import first_day

#: A payer's month in its Redis hash's terms: ``"req"``, ``"base|u:<uid>"``, ... -> count.
Fields = dict[str, int]


@dataclass
class Raised:
    """What a run raised of one kind of payer: how many, and by how many base tokens."""

    payers: int = 0
    tokens: int = 0


def behind(stored: Mapping[str, int], live: Mapping[str, int]) -> Fields:
    """The stored fields above Redis' figure, with the stored figure: what to raise."""
    return {name: n for name, n in stored.items() if n > live.get(name, 0)}


def catch_up(
    live: Fields,
    generation: int,
    stored: Fields | None,
    stored_generation: int | None,
    raise_to: Callable[[Fields], int],
    raised: Raised | None = None,
) -> Fields:
    """The fields to record for a payer read as ``live`` in ``generation``: Redis'
    figures, or where Redis is behind the ``stored`` row of the same generation,
    the higher of the two, after ``raise_to`` (the payer's raise script, given the
    fields behind) lifted Redis to them. ``raised`` counts the payer if it added any."""
    if stored is None or stored_generation != generation:
        return live  # nothing copied before, or a reset since: Redis' figures stand
    targets = behind(stored, live)
    if not targets:
        return live
    added = raise_to(targets)
    if added and raised is not None:
        raised.payers += 1
        raised.tokens += added
    return {**live, **targets}


def catch_up_global(ledger: Ledger, day: str, month: str) -> tuple[int, int]:
    """Raise the global caps' counters of ``day`` and ``month`` to everyone's figures
    in the database (read after this run's users were copied, so those it raised are
    in). Returns the base tokens added to the day and the month. Only where a global
    cap is set: otherwise nothing keeps those counters."""
    if quota_settings.GLOBAL_TOKENS_PER_DAY is None and (
        quota_settings.GLOBAL_TOKENS_PER_MONTH is None
    ):
        return 0, 0
    using = database()
    month_total = (
        UsageSnapshot.objects.using(using)
        .filter(period=first_day(month))
        .aggregate(n=Sum("base_tokens"))["n"]
    )
    day_total = (
        DaySnapshot.objects.using(using)
        .filter(day=day_date(day))
        .aggregate(n=Sum("base_tokens"))["n"]
    )
    return ledger.raise_global(day, int(day_total or 0), month, int(month_total or 0))
