"""The usage report of contract section 6: a user's limits, live usage and cost.

Shared by the usage API and the admin, so both show the same figures: the live
counters from Redis (``Ledger.usage``, which restores lost counters first, as the
next decision would) and the limits of the user's policy.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from llm_quota.conf import quota_settings
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import UserUsage
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import LIMIT_FIELDS
from llm_quota.rules.periods import month_start
from llm_quota.rules.policy import UserPolicy, policy_for

_MICRO_USD = Decimal("0.000001")


def cost_usd(base_tokens: int) -> Decimal:
    """Dollars for ``base_tokens`` at ``BASE_TOKEN_USD_PER_MILLION``, to the micro-dollar."""
    rate = Decimal(str(quota_settings.BASE_TOKEN_USD_PER_MILLION))
    return (Decimal(int(base_tokens)) * rate / Decimal(1_000_000)).quantize(_MICRO_USD)


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
