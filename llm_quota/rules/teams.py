"""Teams as a request sees them: which team pays, and what its limits add to its
member's (contract section 10). No Redis, no HTTP.

Who pays: the API key's team; else the team the request names (its slug: the
``OpenAI-Organization`` header, the SDK's ``organization=``, or ``quota_guard(team=)``);
else the user's team when they have exactly one; else the user alone. Naming a team
one is not a member of is refused (``TeamNotAllowed``). Memberships and teams are read
through the config cache, like tiers, and dropped in every process on save.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llm_quota.exceptions import TeamBlocked, TeamNotAllowed
from llm_quota.rules.config_cache import MISSING, config_cache
from llm_quota.rules.policy import UserPolicy


@dataclass(frozen=True)
class TeamPolicy:
    id: int
    slug: str
    name: str
    tier: str
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    max_concurrent_requests: int | None = None
    max_tokens_per_request: int | None = None
    upgrade: dict[str, str] | None = None
    blocked: bool = False
    soft_limit_percent: int = 80
    #: The team tier's burn-rate breaker (contract §11); None: off.
    burn_multiplier: float | None = None
    burn_floor: int | None = None
    burn_pause: float | None = None


def _load_team(team_id: int) -> TeamPolicy | None:
    from llm_quota.models import TEAM_LIMIT_FIELDS, Team, overridden

    team = Team.objects.select_related("tier", "tier__upgrade_to").filter(pk=team_id).first()
    if team is None:
        return None
    upgrade = None
    if team.tier.upgrade_to is not None:
        upgrade = {"tier": team.tier.upgrade_to.name, "url": team.tier.upgrade_url}
    limits = {
        name: overridden(getattr(team.tier, name), getattr(team, name))
        for name in TEAM_LIMIT_FIELDS
    }
    mult = team.tier.burn_multiplier
    return TeamPolicy(
        id=team.pk, slug=team.slug, name=team.name, tier=team.tier.name,
        upgrade=upgrade, blocked=team.blocked, soft_limit_percent=team.tier.soft_limit_percent,
        burn_multiplier=None if mult is None else float(mult),
        burn_floor=team.tier.burn_floor, burn_pause=team.tier.burn_pause_seconds,
        **limits,
    )  # fmt: skip


def _load_memberships(user_pk: Any) -> dict[str, tuple[int, str]]:
    from llm_quota.models import TeamMembership

    rows = TeamMembership.objects.filter(user_id=user_pk).select_related("team")
    return {row.team.slug: (row.team_id, row.role) for row in rows}


def memberships(user_pk: Any) -> dict[str, tuple[int, str]]:
    """The user's teams: slug -> (team id, role)."""
    return config_cache.get(("teams-of", user_pk), lambda: _load_memberships(user_pk))


def team_policy(team_id: int) -> TeamPolicy | None:
    return config_cache.get(("team", team_id), lambda: _load_team(team_id))


def _chosen(
    mine: dict[str, tuple[int, str]], key_team: int | None, named: str | None
) -> int | None:
    if key_team is not None:
        if key_team not in {team_id for team_id, _ in mine.values()}:
            raise TeamNotAllowed("This API key's team no longer includes its user.")
        return key_team
    if named:
        if named not in mine:
            raise TeamNotAllowed(f"You are not a member of the team '{named[:64]}'.")
        return mine[named][0]
    if len(mine) == 1:
        return next(iter(mine.values()))[0]
    return None


def select_team(user_pk: Any, key_team: int | None, named: str | None) -> TeamPolicy | None:
    """The team that pays for ``user_pk``'s request (see the module docstring)."""
    chosen = _chosen(memberships(user_pk), key_team, named)
    if chosen is None:
        return None
    team = team_policy(chosen)
    if team is None:  # deleted since the memberships were read
        raise TeamNotAllowed("This team no longer exists.")
    if team.blocked:
        raise TeamBlocked()
    return team


def select_team_cached(user_pk: Any, key_team: int | None, named: str | None) -> Any:
    """``select_team`` from memory only, or ``MISSING`` when a row must be read first
    (async code then reads it in a thread)."""
    mine = config_cache.peek(("teams-of", user_pk))
    if mine is MISSING:
        return MISSING
    chosen = _chosen(mine, key_team, named)
    if chosen is None:
        return None
    if config_cache.peek(("team", chosen)) is MISSING:
        return MISSING
    return select_team(user_pk, key_team, named)


def with_team(policy: UserPolicy, team: TeamPolicy | None) -> UserPolicy:
    """``policy`` for a request charged to ``team``: the team's limits join the user's,
    to be reserved in the same step; one request's cap is the lower of the two."""
    if team is None:
        return policy
    cap, cap_name = policy.limits.max_tokens_per_request, policy.limits.max_tokens_per_request_name
    team_cap = team.max_tokens_per_request
    if team_cap is not None and (cap is None or team_cap < cap):
        cap, cap_name = team_cap, "team.max_tokens_per_request"
    limits = dataclasses.replace(
        policy.limits,
        team=str(team.id),
        team_requests_per_minute=team.requests_per_minute,
        team_max_concurrent_requests=team.max_concurrent_requests,
        team_tokens_per_day=team.tokens_per_day,
        team_tokens_per_month=team.tokens_per_month,
        team_burn_multiplier=team.burn_multiplier,
        team_burn_floor=team.burn_floor,
        team_burn_pause=team.burn_pause,
        max_tokens_per_request=cap,
        max_tokens_per_request_name=cap_name,
    )
    return dataclasses.replace(policy, limits=limits, team_upgrade=team.upgrade)
