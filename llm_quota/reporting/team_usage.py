"""A team's usage report, live (contract section 10): the usage shape of section 6 for
the team as a whole, plus ``by_member``. The body of
``/api/llm-quota/teams/<slug>/usage/`` and of the admin's team pages."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from django.contrib.auth import get_user_model

from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import TeamUsage
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import TEAM_LIMIT_FIELDS
from llm_quota.reporting.cost import cost_usd
from llm_quota.rules.periods import month_start
from llm_quota.rules.teams import TeamPolicy


def _usage_row(row: Any) -> dict[str, int]:
    return {
        "requests": row.requests,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "base_tokens": row.base_tokens,
    }


def team_usage_report(team: TeamPolicy, *, ledger: Ledger | None = None) -> dict[str, Any]:
    ledger = ledger or get_ledger()
    usage: TeamUsage = ledger.team_usage(team.id)
    limits = {name: getattr(team, name) for name in TEAM_LIMIT_FIELDS}
    used = {
        "requests_per_minute": usage.requests_this_minute,
        "tokens_per_day": usage.tokens_today,
        "tokens_per_month": usage.tokens_this_month,
        "max_concurrent_requests": usage.in_flight,
    }
    User = get_user_model()
    names = dict(
        User._default_manager.filter(pk__in=[m.user_id for m in usage.by_member]).values_list(
            "pk", User.USERNAME_FIELD
        )
    )
    return {
        "team": team.slug,
        "tier": team.tier,
        "period": {
            "start": month_start(usage.month, ledger.timezone),
            "end": datetime.fromtimestamp(usage.month_end_ms / 1000, ZoneInfo(ledger.timezone)),
        },
        "limits": limits,
        "usage": {
            "tokens_today": usage.tokens_today,
            "tokens_this_month": usage.tokens_this_month,
            "reserved": usage.reserved,
            "requests_this_minute": usage.requests_this_minute,
            "in_flight": usage.in_flight,
        },
        "remaining": {
            name: None if limits[name] is None else max(0, limits[name] - value)
            for name, value in used.items()
        },
        "by_model": [{"model": row.model, **_usage_row(row)} for row in usage.by_model],
        "by_member": [
            {"user": {"id": m.user_id, "username": names.get(_pk(m.user_id), "")}, **_usage_row(m)}
            for m in usage.by_member
        ],  # fmt: skip
        "cost_usd": cost_usd(sum(row.base_tokens for row in usage.by_model)),
        "upgrade": team.upgrade,
    }


def _pk(user_id: str) -> Any:
    return int(user_id) if user_id.isdigit() else user_id
