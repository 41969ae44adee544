"""Copy each team's month and day from Redis into ``TeamUsageSnapshot``: part of every
snapshot run, and what ``ledger/team_restore.py`` brings back after a loss.

Teams are few (organizations, not users), so a run reads every team's month hash in
pipelined batches instead of keeping an index of active ones. It writes only rows that
differ from the database, with absolute values, so a repeated run changes nothing. A
team whose ``seen`` marker is missing lost its counters and has not been restored yet:
its partial figures are never copied over the full ones (the next reserve charged to
it restores them, and a later run copies them). A team whose counters are behind its
row in the same generation is raised back to it (``payer_catch_up``).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from llm_quota.ledger import keys
from llm_quota.ledger.replies import text
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import Team, TeamUsageSnapshot
from llm_quota.reporting.payer_catch_up import Fields, Raised, catch_up
from llm_quota.reporting.snapshot_days import DAY_FIELDS, day_date
from llm_quota.rules.periods import first_day

#: Teams per batch: one Redis pipeline and one transaction each.
BATCH_TEAMS = 500
COUNTERS = {"req": "requests", "in": "input_tokens", "out": "output_tokens", "base": "base_tokens"}
FIELDS = [*COUNTERS.values(), "by_member", "by_model"]


def snapshot_teams(
    ledger: Ledger,
    month: str,
    pks: list[int] | None = None,
    *,
    day: str = "",
    raised: Raised | None = None,
) -> int:
    """Copy ``month`` of every team (or of ``pks``) whose counters are trusted, and with
    ``day`` (today, in ``month``) each team's counter of that day; ``raised`` counts
    the teams found behind the database and raised. Returns the rows written."""
    written = 0
    if pks is None:
        pks = list(Team.objects.order_by("pk").values_list("pk", flat=True))
    for start in range(0, len(pks), BATCH_TEAMS):
        written += _copy(ledger, month, pks[start : start + BATCH_TEAMS], day, raised)
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


def month_fields(fields: dict[Any, Any]) -> Fields:
    """A team's month hash as field name -> count, only the fields a row keeps."""
    return {
        name: int(value)
        for raw, value in fields.items()
        if (name := text(raw)).partition("|")[0] in COUNTERS
        and name.partition("|")[2][:2] in ("", "u:", "m:")
    }


def row_fields(row: dict[str, Any]) -> Fields:
    """A stored ``TeamUsageSnapshot`` row as its month hash's fields (``team_month``
    the other way), leaving out any name Redis would not accept."""
    fields: Fields = {kind: int(row[name]) for kind, name in COUNTERS.items()}
    parts = (("u", row["by_member"], keys.user_id), ("m", row["by_model"], keys.model_field))
    for tag, stored, valid in parts:
        for who, counts in stored.items():
            try:
                suffix = f"|{tag}:{valid(who)}"
            except keys.InvalidKeyPart:
                continue
            for kind, name in COUNTERS.items():
                fields[kind + suffix] = int(counts.get(name, 0))
    return fields


def _copy(ledger: Ledger, month: str, pks: list[int], day: str, raised: Raised | None) -> int:
    pipe = ledger.client.pipeline(transaction=False)
    for pk in pks:
        pipe.hmget(ledger.keyspace.team_state(pk), "seen", "gen")
        pipe.hgetall(ledger.keyspace.team_usage(pk, month))
        if day:
            pipe.get(ledger.keyspace.team_day(pk, day))
    replies = pipe.execute()
    step = 3 if day else 2
    fields_written = [*FIELDS, *(DAY_FIELDS if day else ()), "generation"]
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
            (seen, gen), fields = replies[step * index], replies[step * index + 1]
            if not seen:
                continue  # lost, not restored yet
            generation = int(gen or 0)
            before = stored.get(pk)
            live = month_fields(fields)

            def raise_to(targets: Fields, pk: int = pk, gen: int = generation) -> int:
                return int(ledger.raise_team(pk, gen, month, targets))

            kept = catch_up(
                live, generation, None if before is None else row_fields(before),
                None if before is None else before["generation"], raise_to, raised,
            )  # fmt: skip
            wanted = team_month(kept)
            wanted["generation"] = generation
            if day:
                wanted["day"] = day_date(day)
                # What a raise added to the month, it added to today's counter too.
                lifted = kept.get("base", 0) - live.get("base", 0)
                wanted["day_base_tokens"] = int(replies[step * index + 2] or 0) + lifted
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
