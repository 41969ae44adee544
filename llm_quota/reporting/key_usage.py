"""An API key's usage report, live: its limits, Redis' counters of it, what remains.

The body of ``/api/llm-quota/keys/<id>/usage/`` and the admin's key pages. The last
use is the active-key index's (``settle.lua``), newer than the database's copy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from llm_quota.ledger import keys
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import KeyUsage
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import ApiKey
from llm_quota.rules.periods import month_start


def last_used_ms(ledger: Ledger, key: ApiKey, month: str) -> int | None:
    """When the key last settled a call this month, per the index (None: not yet)."""
    uid = keys.user_id(key.user_id)
    base = ledger.ops.index_base(uid)
    score = ledger.client.zscore(f"{base}:k:{month}", f"{uid}:{key.pk}")
    return None if score is None else int(score)


def key_usage_report(key: ApiKey, *, ledger: Ledger | None = None) -> dict[str, Any]:
    ledger = ledger or get_ledger()
    usage: KeyUsage = ledger.key_usage(key.user_id, key.pk)
    limits = {
        "requests_per_minute": key.requests_per_minute,
        "tokens_per_day": key.tokens_per_day,
        "tokens_per_month": key.tokens_per_month,
    }
    used = {
        "requests_per_minute": usage.requests_this_minute,
        "tokens_per_day": usage.tokens_today,
        "tokens_per_month": usage.tokens_this_month,
    }
    last = last_used_ms(ledger, key, usage.month)
    last_used = datetime.fromtimestamp(last / 1000, UTC) if last else key.last_used_at
    return {
        "id": key.pk,
        "name": key.name,
        "prefix": key.prefix,
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
            "requests_this_month": usage.requests,
            "input_tokens_this_month": usage.input_tokens,
            "output_tokens_this_month": usage.output_tokens,
            "settled_this_month": usage.base_tokens,
        },
        "remaining": {
            name: None if limit is None else max(0, limit - used[name])
            for name, limit in limits.items()
        },
        "last_used_at": last_used,
    }
