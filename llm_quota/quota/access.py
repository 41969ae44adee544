"""Who may call at all: checked before anything is priced or sent to Redis.

Every path (the gateway, ``HasScope``, the throttle, ``@quota_gated``, ``quota_guard``)
asks the same two questions in the same order. A blocked user is refused as blocked
(403 ``user_blocked``), not as out of scope: blocking empties a user's scopes, so
asking about the scope first would hide the reason. Then the scope (403
``insufficient_scope``). Nothing here touches Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rest_framework.exceptions import NotAuthenticated

from llm_quota.exceptions import InsufficientScope, QuotaBlocked
from llm_quota.ledger.plans import Plan
from llm_quota.quota.admission import pk_plan, policy_plan
from llm_quota.rules.api_keys import ApiKeyCredential, with_key
from llm_quota.rules.policy import UserPolicy


def refuse_blocked(policy: UserPolicy) -> None:
    """Raise ``QuotaBlocked`` (403 ``user_blocked``) for a blocked user."""
    if policy.blocked:
        raise QuotaBlocked(policy.blocked_reason or None)


def require_scopes(required: Iterable[str], granted: set[str]) -> None:
    """Raise ``InsufficientScope`` (403) naming every required scope not granted."""
    missing = set(required) - granted
    if missing:
        raise InsufficientScope(f"This endpoint requires the scope(s) {' '.join(sorted(missing))}.")


def tier_access_plan(
    user: Any, scope: str, api_key: ApiKeyCredential | None = None
) -> Plan[UserPolicy]:
    """``user`` (a user or a service account's pk) may call: not blocked, and its tier
    grants ``scope`` (``""`` skips the scope). For callers with no token to read
    (``quota_guard``): the tier's scopes are all they hold, or with ``api_key`` the
    key's within them."""
    pk = yield from pk_plan(user)
    if pk is None:
        raise NotAuthenticated()
    policy = with_key((yield from policy_plan(pk)), api_key)
    refuse_blocked(policy)
    if scope:
        require_scopes([scope], set(policy.scopes))
    return policy
