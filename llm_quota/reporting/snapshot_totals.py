"""Totals of ``UsageSnapshot`` rows for the admin's usage page: spend per month by
model, this month's models and top users.

They read the database, not Redis: one query each however many users there are,
at the cost of lagging the live counters by up to one ``SNAPSHOT_INTERVAL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Sum

from llm_quota.models import UsageSnapshot, UserQuota
from llm_quota.reporting.bars import whole_percent
from llm_quota.rules.periods import add_months
from llm_quota.rules.policy import default_tier


@dataclass(frozen=True)
class MonthlySpend:
    periods: list[date]
    #: model -> base tokens per period (same order as ``periods``); small models
    #: beyond the first few are summed under "other".
    by_model: dict[str, list[int]]


def monthly_spend(until: date, months: int = 12, top_models: int = 6) -> MonthlySpend:
    periods = [add_months(until, -n) for n in range(months - 1, -1, -1)]
    rows = (
        UsageSnapshot.objects.filter(period__gte=periods[0], period__lte=periods[-1])
        .values("period", "model")
        .annotate(base=Sum("base_tokens"))
    )
    totals: dict[str, int] = {}
    cells: dict[tuple[str, date], int] = {}
    for row in rows:
        totals[row["model"]] = totals.get(row["model"], 0) + row["base"]
        cells[(row["model"], row["period"])] = row["base"]
    ranked = sorted(totals, key=lambda m: (-totals[m], m))
    shown, rest = ranked[:top_models], ranked[top_models:]
    by_model = {m: [cells.get((m, p), 0) for p in periods] for m in shown}
    if rest:
        by_model["other"] = [sum(cells.get((m, p), 0) for m in rest) for p in periods]
    return MonthlySpend(periods, by_model)


@dataclass(frozen=True)
class ModelTotal:
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    base_tokens: int


def model_totals(period: date) -> list[ModelTotal]:
    rows = (
        UsageSnapshot.objects.filter(period=period)
        .values("model")
        .annotate(
            requests=Sum("requests"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            base_tokens=Sum("base_tokens"),
        )
        .order_by("-base_tokens", "model")
    )
    return [ModelTotal(**row) for row in rows]


@dataclass(frozen=True)
class UserTotal:
    user_id: Any
    username: str
    base_tokens: int
    requests: int
    tier: str | None
    budget: int | None  # tokens_per_month in effect (override or tier); None: unlimited

    @property
    def percent(self) -> int | None:
        """Whole percent of the budget, rounded down as the admin's bars round it."""
        return None if not self.budget else whole_percent(self.base_tokens, self.budget)


def top_users(period: date, limit: int = 10) -> list[UserTotal]:
    rows = list(
        UsageSnapshot.objects.filter(period=period)
        .values("user_id")
        .annotate(base=Sum("base_tokens"), requests=Sum("requests"))
        .order_by("-base", "user_id")[:limit]
    )
    ids = [row["user_id"] for row in rows]
    User = get_user_model()
    names = {u.pk: u.get_username() for u in User._default_manager.filter(pk__in=ids)}
    quotas = {
        q.user_id: q for q in UserQuota.objects.filter(user_id__in=ids).select_related("tier")
    }
    default = default_tier()
    out = []
    for row in rows:
        quota = quotas.get(row["user_id"])
        tier = quota.tier if quota is not None else default
        if quota is not None:
            budget = quota.monthly_budget
        else:
            budget = tier.tokens_per_month if tier is not None else None
        out.append(
            UserTotal(
                user_id=row["user_id"],
                username=names.get(row["user_id"], f"#{row['user_id']}"),
                base_tokens=row["base"],
                requests=row["requests"],
                tier=tier.name if tier is not None else None,
                budget=budget,
            )
        )
    return out
