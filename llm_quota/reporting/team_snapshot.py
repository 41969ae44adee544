"""Copy each team's month and day from Redis into ``TeamUsageSnapshot``: part of every
snapshot run, and what ``ledger/team_restore.py`` brings back after a loss.

Teams are few (organizations, not users), so a run reads every team's month hash in
pipelined batches instead of keeping an index of active ones. It writes only rows that
differ from the database, with absolute values, so a repeated run changes nothing. A
team whose ``seen`` marker is missing lost its counters and has not been restored yet:
its partial figures are never copied over the full ones (the next reserve charged to
it restores them, and a later run copies them).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from llm_quota.ledger.replies import text
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import Team, TeamUsageSnapshot
from llm_quota.reporting.snapshot_days import DAY_FIELDS, day_date
from llm_quota.rules.periods import first_day

#: Teams per batch: one Redis pipeline and one transaction each.
BATCH_TEAMS = 500
COUNTERS = {"req": "requests", "in": "input_tokens", "out": "output_tokens", "base": "base_tokens"}
FIELDS = [*COUNTERS.values(), "by_member", "by_model"]


def snapshot_teams(
    ledger: Ledger, month: str, pks: list[int] | None = None, *, day: str = ""
) -> int:
    """Copy ``month`` of every team (or of ``pks``) whose counters are trusted, and with
    ``day`` (today, in ``month``) each team's counter of that day; returns the rows
    written."""
    written = 0
    if pks is None:
        pks = list(Team.objects.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(pks), BATCH_TEAMS):
        written += _copy(ledger, month, pks[start : start + BATCH_TEAMS], day)
    return written


def team_month(fields: dict[Any, Any]) -> dict[str, Any]:
    """A team's month hash (``T:n:<month>``) as ``TeamUsageSnapshot`` fields."""
    row: dict[str, Any] = {name: 0 for name in COUNTERS.values()}
    row["by_member"], row["by_model"] = {}, {}
    for raw, value in fields.items():
        kind, _, who = text(raw).partition("|")
        if kind not in COUNTERS:
            continue
        if not who:
            row[COUNTERS[kind]] = int(value)
        elif who[:2] in ("u:", "m:"):
            into = row["by_member"] if who[0] == "u" else row["by_model"]
            into.setdefault(who[2:], {name: 0 for name in COUNTERS.values()})
            into[who[2:]][COUNTERS[kind]] = int(value)
    return row


def _copy(ledger: Ledger, month: str, pks: list[int], day: str) -> int:
    pipe = ledger.client.pipeline(transaction=False)
    for pk in pks:
        pipe.hexists(ledger.keyspace.team_state(pk), "seen")
        pipe.hgetall(ledger.keyspace.team_usage(pk, month))
        if day:
            pipe.get(ledger.keyspace.team_day(pk, day))
    replies = pipe.execute()
    step = 3 if day else 2
    fields_written = [*FIELDS, *(DAY_FIELDS if day else ())]
    period = first_day(month)
    rows = []
    with transaction.atomic():
        stored = {
            row["team_id"]: row
            for row in TeamUsageSnapshot.objects.filter(team_id__in=pks, period=period).values(
                "team_id", *fields_written
            )
        }
        for index, pk in enumerate(pks):
            seen, fields = replies[step * index], replies[step * index + 1]
            if not seen:
                continue  # lost, not restored yet
            wanted = team_month(fields)
            if day:
                wanted["day"] = day_date(day)
                wanted["day_base_tokens"] = int(replies[step * index + 2] or 0)
            before = stored.get(pk)
            if before is None and not fields:
                continue  # no usage this month, none recorded
            if before is not None and all(before[name] == wanted[name] for name in fields_written):
                continue
            rows.append(TeamUsageSnapshot(team_id=pk, period=period, **wanted))
        TeamUsageSnapshot.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["team", "period"],
            update_fields=[*fields_written, "updated_at"],
        )
    return len(rows)
