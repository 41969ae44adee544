"""What applies to a user: their tier, effective limits, scopes and allowed models.

A user without a ``UserQuota`` is on the default tier (``is_default``, else the tier
named ``DEFAULT_TIER``). Per-user overrides replace the tier's value field by field: empty
inherits the tier's, 0 makes that limit unlimited for the user (``models.overridden``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from llm_quota.conf import quota_settings
from llm_quota.rules.accounting import Limits
from llm_quota.rules.config_cache import config_cache


@dataclass(frozen=True)
class UserPolicy:
    tier: str | None
    limits: Limits
    scopes: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] = ()
    soft_limit_percent: int = 80
    upgrade: dict[str, str] | None = None
    blocked: bool = False
    blocked_reason: str = ""
    #: The paying team's upgrade offer (``rules.teams.with_team``), for its refusals.
    team_upgrade: dict[str, str] | None = None

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or any(
            fnmatch.fnmatchcase(model, pattern) for pattern in self.allowed_models
        )


def _global_limits() -> dict[str, Any]:
    return {
        "global_tokens_per_day": quota_settings.GLOBAL_TOKENS_PER_DAY,
        "global_tokens_per_month": quota_settings.GLOBAL_TOKENS_PER_MONTH,
    }


def _burn_limits(tier: Any) -> dict[str, Any]:
    """The tier's runaway protection: the burn-rate breaker (None: off) and the
    slow-down past the soft limit (None: the tier only alerts)."""
    from llm_quota.models import SoftLimitMode

    mult = tier.burn_multiplier
    slow = tier.soft_limit_mode == SoftLimitMode.SLOW
    return {
        "burn_multiplier": None if mult is None else float(mult),
        "burn_floor": tier.burn_floor,
        "burn_pause": tier.burn_pause_seconds,
        "slow_soft_percent": tier.soft_limit_percent if slow else None,
    }


def _default_tier() -> Any:
    from llm_quota.models import Tier

    tier = Tier.objects.select_related("upgrade_to").filter(is_default=True).first()
    if tier is None:
        tier = (
            Tier.objects.select_related("upgrade_to")
            .filter(name=quota_settings.DEFAULT_TIER)
            .first()
        )
    return tier


def default_tier() -> Any:
    """The tier of users without a ``UserQuota`` (or None), from the config cache."""
    return config_cache.get("default-tier", _default_tier)


def limits_in_effect(tier: Any, quota: Any) -> dict[str, Any]:
    """Each of ``LIMIT_FIELDS`` for a user on ``tier`` with ``quota`` (or None): the
    tier's value unless the quota overrides it (None: unlimited). The policy and the
    admin's "limits in effect" both read it, so they cannot disagree."""
    from llm_quota.models import LIMIT_FIELDS, overridden

    return {
        name: overridden(getattr(tier, name, None), None if quota is None else getattr(quota, name))
        for name in LIMIT_FIELDS
    }


def _load(user_pk: Any) -> UserPolicy:
    from llm_quota.models import UserQuota

    quota = (
        UserQuota.objects.select_related("tier", "tier__upgrade_to").filter(user_id=user_pk).first()
    )
    tier = quota.tier if quota is not None else config_cache.get("default-tier", _default_tier)
    if tier is None:
        return UserPolicy(
            tier=None,
            limits=Limits(**_global_limits()),
            blocked=True,
            blocked_reason="No default tier is configured.",
        )
    values = limits_in_effect(tier, quota)
    upgrade = None
    if tier.upgrade_to is not None:
        upgrade = {"tier": tier.upgrade_to.name, "url": tier.upgrade_url}
    blocked = bool(quota is not None and quota.blocked)
    return UserPolicy(
        tier=tier.name,
        limits=Limits(**values, **_global_limits(), **_burn_limits(tier)),
        scopes=() if blocked else tuple(tier.scope_list),
        allowed_models=tuple(tier.model_patterns),
        soft_limit_percent=tier.soft_limit_percent,
        upgrade=upgrade,
        blocked=blocked,
        blocked_reason="LLM access is blocked for this account." if blocked else "",
    )


def policy_for(user: Any) -> UserPolicy:
    """The policy of ``user`` (a user instance or a primary key)."""
    pk = getattr(user, "pk", user)
    return config_cache.get(("policy", pk), lambda: _load(pk))
