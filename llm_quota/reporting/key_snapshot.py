"""Copy each active API key's month and day from Redis into ``ApiKeyUsageSnapshot``,
and its last use into ``ApiKey.last_used_at``: part of every snapshot run.

Keys are found through the index ``settle.lua`` keeps (``<uid>:<key id>`` -> time of
its last settle), never ``KEYS``. The writes are absolute values, so a repeated run
changes nothing; ``last_used_at`` only moves forward, once per key per run, however
many requests the key made: no database write per request. The day columns hold the
key's counter of today, written with the current month's row (``DAY_FIELDS``). A key
whose user's ``seen`` marker is missing lost its counters with the user's and is not
restored yet: its partial figures are not copied over the full ones (as for users).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from django.db import transaction

from llm_quota.ledger import keys
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import ApiKey, ApiKeyUsageSnapshot
from llm_quota.reporting.snapshot_days import DAY_FIELDS, day_date
from llm_quota.rules.periods import first_day

#: Keys per batch: one Redis pipeline and one transaction each.
BATCH_KEYS = 500
COUNTERS = {"req": "requests", "in": "input_tokens", "out": "output_tokens", "base": "base_tokens"}


def snapshot_keys(ledger: Ledger, month: str, *, since_ms: int | None = None, day: str = "") -> int:
    """Copy ``month`` of the keys active since ``since_ms`` (all of them if None), and
    with ``day`` (today, in ``month``) each key's counter of that day; returns how many
    keys were read."""
    entries = ledger.active_keys(month, since_ms=since_ms)
    read = 0
    while batch := list(islice(entries, BATCH_KEYS)):
        _copy(ledger, month, batch, day)
        read += len(batch)
    return read


def _parse(member: str) -> tuple[str, int] | None:
    uid, _, key_id = member.rpartition(":")
    try:
        return keys.user_id(uid), int(keys.api_key_id(key_id))
    except (keys.InvalidKeyPart, ValueError):
        return None


def _copy(ledger: Ledger, month: str, batch: Iterable[tuple[str, int]], day: str) -> None:
    parsed = [(p, score) for member, score in batch if (p := _parse(member)) is not None]
    pipe = ledger.client.pipeline(transaction=False)
    for (uid, key_id), _score in parsed:
        pipe.hexists(ledger.keyspace.user_state(uid), "seen")
        pipe.hgetall(f"{ledger.keyspace.api_key(uid, key_id)}:n:{month}")
        if day:
            pipe.get(ledger.keyspace.api_key_day(uid, key_id, day))
    replies = pipe.execute() if parsed else []
    step = 3 if day else 2
    period = first_day(month)
    known = set(
        ApiKey.objects.filter(pk__in=[k for (_u, k), _s in parsed]).values_list("pk", flat=True)
    )
    rows = []
    with transaction.atomic():
        for index, ((_uid, key_id), score) in enumerate(parsed):
            if key_id not in known:
                continue  # deleted since: its counters expire with the month
            used = datetime.fromtimestamp(score / 1000, UTC)
            ApiKey.objects.filter(pk=key_id).exclude(last_used_at__gte=used).update(
                last_used_at=used
            )
            seen, fields = replies[step * index], replies[step * index + 1]
            if not seen:
                # Its user lost their counters and is not restored yet (a settle that
                # came late): the key's partial figures must not overwrite the full ones.
                continue
            values: dict[str, Any] = {
                COUNTERS[k]: int(v) for k, v in _decoded(fields) if k in COUNTERS
            }
            if day:
                values["day"] = day_date(day)
                values["day_base_tokens"] = int(replies[step * index + 2] or 0)
            rows.append(ApiKeyUsageSnapshot(api_key_id=key_id, period=period, **values))
        ApiKeyUsageSnapshot.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["api_key", "period"],
            update_fields=[*COUNTERS.values(), *(DAY_FIELDS if day else ()), "updated_at"],
        )


def _decoded(fields: dict) -> Iterable[tuple[str, bytes | str]]:
    for name, value in fields.items():
        yield (name.decode() if isinstance(name, bytes) else name), value
