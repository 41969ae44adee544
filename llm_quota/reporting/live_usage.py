"""A user's usage report, live: their tier's limits, Redis' counters, what remains, the cost.

The body of ``/api/llm-quota/usage/`` and of its staff twin for any user. The
counters come from ``Ledger.usage``, which restores lost counters first, so the
report shows what the user's next request would be decided on.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import UserUsage
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import LIMIT_FIELDS
from llm_quota.reporting.cost import cost_usd
from llm_quota.rules.periods import month_start
from llm_quota.rules.policy import UserPolicy, policy_for


def remaining(policy: UserPolicy, usage: UserUsage) -> dict[str, int | None]:
    """What is left under each consumable limit (None: unlimited)."""
    used = {
        "requests_per_minute": usage.requests_this_minute,
        "tokens_per_minute": usage.tokens_this_minute,
        "tokens_per_day": usage.tokens_today,
        "tokens_per_month": usage.tokens_this_month,
        "max_concurrent_requests": usage.in_flight,
    }
    out: dict[str, int | None] = {}
    for name, value in used.items():
        limit = getattr(policy.limits, name)
        out[name] = None if limit is None else max(0, limit - value)
    return out


def usage_report(
    user_pk: Any, *, ledger: Ledger | None = None, usage: UserUsage | None = None
) -> dict[str, Any]:
    """The ``/api/llm-quota/usage/`` body for one user."""
    ledger = ledger or get_ledger()
    policy = policy_for(user_pk)
    usage = usage or ledger.usage(user_pk)
    tz = ZoneInfo(ledger.timezone)
    return {
        "tier": policy.tier,
        "period": {
            "start": month_start(usage.month, ledger.timezone),
            "end": datetime.fromtimestamp(usage.month_end_ms / 1000, tz),
        },
        "limits": {name: getattr(policy.limits, name) for name in LIMIT_FIELDS},
        "usage": {
            "tokens_today": usage.tokens_today,
            "tokens_this_month": usage.tokens_this_month,
            "reserved": usage.reserved,
            "requests_this_minute": usage.requests_this_minute,
        },
        "remaining": remaining(policy, usage),
        "by_model": [
            {
                "model": row.model,
                "requests": row.requests,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "base_tokens": row.base_tokens,
            }
            for row in usage.by_model
        ],
        "cost_usd": cost_usd(usage.settled_this_month),
        "upgrade": policy.upgrade,
    }
