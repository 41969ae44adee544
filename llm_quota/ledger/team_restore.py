"""Where a team's counters come back from after Redis lost them: its snapshots.

The ledger asks once per team per loss (the ``seen`` marker in ``lua/team_restore.lua``),
before the next decision charged to the team: its month, and its day if the snapshot's
day is still today. As for users, what the last snapshot did not hold cannot be restored.
"""

from __future__ import annotations

from llm_quota.ledger.replies import MemberUsage, ModelUsage, TeamMonth
from llm_quota.rules.periods import day_id, first_day

COUNTERS = ("requests", "input_tokens", "output_tokens", "base_tokens")


def team_month_from_snapshots(team_id: str, month: str) -> TeamMonth | None:
    """The team's ``month`` (and its latest copied day) as its ``TeamUsageSnapshot``
    holds it, or None."""
    from llm_quota.models import TeamUsageSnapshot

    row = TeamUsageSnapshot.objects.filter(team_id=team_id, period=first_day(month)).first()
    if row is None:
        return None
    return TeamMonth(
        total=ModelUsage("", *(getattr(row, name) for name in COUNTERS)),
        by_member=[MemberUsage(uid, *_counts(c)) for uid, c in sorted(row.by_member.items())],
        by_model=[ModelUsage(name, *_counts(c)) for name, c in sorted(row.by_model.items())],
        day=day_id(row.day),
        day_base_tokens=row.day_base_tokens,
    )


def _counts(stored: dict) -> list[int]:
    return [int(stored.get(name, 0)) for name in COUNTERS]
