"""Copy each active API key's month and day from Redis into ``ApiKeyUsageSnapshot``,
and its last use into ``ApiKey.last_used_at``: part of every snapshot run.

Keys are found through the index ``settle.lua`` keeps (``<uid>:<key id>`` -> time of
its last settle), never ``KEYS``. The writes are absolute values, so a repeated run
changes nothing; ``last_used_at`` only moves forward, once per key per run, however
many requests the key made: no database write per request. The day columns hold the
key's counter of today, written with the current month's row (``DAY_FIELDS``). A key
whose user's ``seen`` marker is missing lost its counters with the user's and is not
restored yet: its partial figures are not copied over the full ones (as for users).
A key whose counters are behind its row in the same generation is raised back to it
(``payer_catch_up``); after a failover (``stored_too``) the keys with a row of the
month are read too, since a stale replica's index misses the same writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from django.db import transaction

from llm_quota.ledger import keys
from llm_quota.ledger.replies import text
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import ApiKey, ApiKeyUsageSnapshot
from llm_quota.reporting.payer_catch_up import Fields, Raised, catch_up
from llm_quota.reporting.snapshot_days import DAY_FIELDS, day_date
from llm_quota.rules.periods import first_day

#: Keys per batch: one Redis pipeline and one transaction each.
BATCH_KEYS = 500
COUNTERS = {"req": "requests", "in": "input_tokens", "out": "output_tokens", "base": "base_tokens"}


def snapshot_keys(
    ledger: Ledger,
    month: str,
    *,
    since_ms: int | None = None,
    day: str = "",
    stored_too: bool = False,
    raised: Raised | None = None,
) -> int:
    """Copy ``month`` of the keys active since ``since_ms`` (all of them if None), and
    with ``day`` (today, in ``month``) each key's counter of that day; with
    ``stored_too``, also the keys the database has a row of ``month`` for. ``raised``
    counts the keys found behind the database and raised. Returns how many keys were
    read."""
    entries: Iterator[tuple[str, int | None]] = iter(ledger.active_keys(month, since_ms=since_ms))
    if stored_too:
        entries = _and_stored(entries, month)
    read = 0
    while batch := list(islice(entries, BATCH_KEYS)):
        _copy(ledger, month, batch, day, raised)
        read += len(batch)
    return read


def _and_stored(
    entries: Iterable[tuple[str, int | None]], month: str
) -> Iterator[tuple[str, int | None]]:
    """The index's keys, then those with a row of ``month`` that it does not list (no
    settle time to give ``last_used_at``)."""
    listed: set[str] = set()
    for member, score in entries:
        listed.add(member)
        yield member, score
    stored = ApiKeyUsageSnapshot.objects.filter(period=first_day(month)).values_list(
        "api_key__user_id", "api_key_id"
    )
    for user_pk, key_id in stored.iterator(chunk_size=BATCH_KEYS):
        member = f"{keys.user_id(user_pk)}:{key_id}"
        if member not in listed:
            yield member, None


def _parse(member: str) -> tuple[str, int] | None:
    uid, _, key_id = member.rpartition(":")
    try:
        return keys.user_id(uid), int(keys.api_key_id(key_id))
    except (keys.InvalidKeyPart, ValueError):
        return None


#: A key's row as its month hash's fields.
ROW_FIELDS = {name: kind for kind, name in COUNTERS.items()}


def _copy(
    ledger: Ledger,
    month: str,
    batch: Iterable[tuple[str, int | None]],
    day: str,
    raised: Raised | None,
) -> None:
    parsed = [(p, score) for member, score in batch if (p := _parse(member)) is not None]
    pipe = ledger.client.pipeline(transaction=False)
    for (uid, key_id), _score in parsed:
        pipe.hexists(ledger.keyspace.user_state(uid), "seen")
        pipe.hgetall(f"{ledger.keyspace.api_key(uid, key_id)}:n:{month}")
        pipe.hget(f"{ledger.keyspace.api_key(uid, key_id)}:s", "gen")
        if day:
            pipe.get(ledger.keyspace.api_key_day(uid, key_id, day))
    replies = pipe.execute() if parsed else []
    step = 4 if day else 3
    period = first_day(month)
    ids = [k for (_u, k), _s in parsed]
    known = set(ApiKey.objects.filter(pk__in=ids).values_list("pk", flat=True))
    written = [*COUNTERS.values(), *(DAY_FIELDS if day else ()), "generation"]
    rows = []
    with transaction.atomic():
        stored = {
            row["api_key_id"]: row
            for row in ApiKeyUsageSnapshot.objects.filter(api_key_id__in=ids, period=period)
            .values("api_key_id", *written)
        }  # fmt: skip
        for index, ((uid, key_id), score) in enumerate(parsed):
            if key_id not in known:
                continue  # deleted since: its counters expire with the month
            if score is not None:
                used = datetime.fromtimestamp(score / 1000, UTC)
                ApiKey.objects.filter(pk=key_id).exclude(last_used_at__gte=used).update(
                    last_used_at=used
                )
            seen, fields, gen = replies[step * index : step * index + 3]
            if not seen:
                # Its user lost their counters and is not restored yet (a settle that
                # came late): the key's partial figures must not overwrite the full ones.
                continue
            generation = int(gen or 0)
            before = stored.get(key_id)
            live: Fields = {k: int(v) for k, v in _decoded(fields) if k in COUNTERS}

            def raise_to(
                targets: Fields, uid: str = uid, key_id: int = key_id, gen: int = generation
            ) -> int:
                return int(ledger.raise_key(uid, key_id, gen, month, targets))

            kept = catch_up(
                live, generation, _row_fields(before), None if before is None else
                before["generation"], raise_to, raised,
            )  # fmt: skip
            values: dict[str, Any] = {name: kept.get(kind, 0) for kind, name in COUNTERS.items()}
            values["generation"] = generation
            if day:
                values["day"] = day_date(day)
                # What a raise added to the month, it added to today's counter too.
                lifted = kept.get("base", 0) - live.get("base", 0)
                values["day_base_tokens"] = int(replies[step * index + 3] or 0) + lifted
            if before is None and not fields:
                continue  # no usage this month, none recorded
            if before is not None and all(before[name] == values[name] for name in written):
                continue
            rows.append(ApiKeyUsageSnapshot(api_key_id=key_id, period=period, **values))
        ApiKeyUsageSnapshot.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["api_key", "period"],
            update_fields=[*written, "updated_at"],
        )


def _row_fields(row: dict[str, Any] | None) -> Fields | None:
    """A stored row's counters as the key's month hash names them."""
    if row is None:
        return None
    return {kind: int(row[name]) for name, kind in ROW_FIELDS.items()}


def _decoded(fields: dict) -> Iterable[tuple[str, bytes | str]]:
    for name, value in fields.items():
        yield text(name), value
