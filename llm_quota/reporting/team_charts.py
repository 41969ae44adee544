"""The team admin page's chart: the team's monthly usage by member, from its snapshots
(``TeamUsageSnapshot``), in the admin's inline-SVG style (``charts.py``)."""

from __future__ import annotations

from datetime import date

from django.contrib.auth import get_user_model
from django.utils.safestring import SafeString

from llm_quota.models import TeamUsageSnapshot
from llm_quota.reporting import charts
from llm_quota.rules.periods import add_months

#: Members drawn apart; the rest share one "others" series (the palette has eight).
TOP_MEMBERS = 7


def team_usage_chart(team_id: int, last: date, months: int = 6) -> SafeString:
    """Base tokens per month for the ``months`` months up to ``last`` (a month's first
    day), stacked by member, the largest members first."""
    periods = [add_months(last, n) for n in range(1 - months, 1)]
    rows = {
        row.period: row
        for row in TeamUsageSnapshot.objects.filter(team_id=team_id, period__in=periods)
    }
    per_member: dict[str, list[float]] = {}
    for i, period in enumerate(periods):
        row = rows.get(period)
        for uid, counts in (row.by_member if row else {}).items():
            per_member.setdefault(uid, [0.0] * len(periods))[i] += counts.get("base_tokens", 0)
    ranked = sorted(per_member, key=lambda uid: -sum(per_member[uid]))
    shown, rest = ranked[:TOP_MEMBERS], ranked[TOP_MEMBERS:]
    names = _usernames(shown)
    series = [charts.Series(names.get(uid, uid), per_member[uid]) for uid in shown]
    if rest:
        others = [sum(per_member[uid][i] for uid in rest) for i in range(len(periods))]
        series.append(charts.Series(f"{len(rest)} others", others))
    return charts.stacked_bars(
        [f"{period:%b %Y}" for period in periods],
        series,
        label="Team base tokens per month, by member",
        height=260,
    )


def _usernames(uids: list[str]) -> dict[str, str]:
    user_model = get_user_model()
    pk = user_model._meta.pk
    assert pk is not None
    wanted = [pk.to_python(uid) for uid in uids]
    return {str(user.pk): user.get_username() for user in user_model.objects.filter(pk__in=wanted)}
