"""Copy each active user's Redis usage into ``UsageSnapshot``: the durable record.

Redis is the only counter, but it may lose its data; the snapshots are what
``restore.py`` brings back. So a run must be safe to repeat at any time:

- it finds users through the index that ``settle.lua`` maintains (a ZSET per month),
  walked with ZSCAN in batches, never ``KEYS``;
- it reads each batch's per-model hashes in one pipeline, read-only (no script, so
  no housekeeping: a snapshot never reclaims or changes a counter);
- it writes *absolute* values with an upsert on (user, period, model), and only the
  rows that differ from the database, so a duplicate, retried or concurrent run
  writes the same rows or nothing;
- runs are serialised by a Redis lock, so an older read can never overwrite a newer
  one; a run that waits for the lock then copies what is current.

A user whose ``seen`` marker is missing lost their counters with Redis and has not
been restored yet: their partial figures are skipped, never copied over the full
ones in the database (the next request restores them first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from redis.exceptions import LockError

from llm_quota.redis_ledger import Ledger, ModelUsage, get_ledger, parse_model_fields

logger = logging.getLogger("llm_quota")

#: Seconds a run holds the lock without progress before another may take it.
LOCK_TTL = 60
#: How long the status of the last run is kept (the admin's durability window).
STATUS_TTL = 40 * 86400

SNAPSHOT_FIELDS = ("requests", "input_tokens", "output_tokens", "base_tokens")


class SnapshotBusy(RuntimeError):
    """Another run held the lock for longer than this one would wait."""


@dataclass
class SnapshotRun:
    """What one run did; kept in Redis for the admin and returned by the task."""

    months: list[str]
    started_ms: int = 0
    finished_ms: int = 0
    users: int = 0  # index entries read
    rows_written: int = 0  # rows inserted or changed
    lost: int = 0  # users skipped: counters lost, not restored yet
    unknown: int = 0  # ids with no such user in the database
    per_month: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def period_of(month: str) -> date:
    return date(int(month[:4]), int(month[4:6]), 1)


def months_to_copy(ledger: Ledger, now_ms: int) -> list[str]:
    """The current month and the one just closed (late settles still land there)."""
    _, month = ledger.periods(now_ms)
    first = period_of(month)
    previous = date(first.year - (first.month == 1), (first.month - 2) % 12 + 1, 1)
    return [month, previous.strftime("%Y%m")]


def count_active(ledger: Ledger | None = None) -> int:
    """Index entries a run will read (for a progress bar)."""
    ledger = ledger or get_ledger()
    months = months_to_copy(ledger, ledger.now_ms())
    return sum(ledger.count_active_users(month) for month in months)


def snapshot_usage(
    *,
    ledger: Ledger | None = None,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
    lock_wait: float = 30.0,
) -> SnapshotRun:
    """Copy the current and just-closed month of every active user into the database."""
    ledger = ledger or get_ledger()
    lock = ledger.client.lock(
        ledger.keyspace.snapshot_lock(), timeout=LOCK_TTL, blocking_timeout=lock_wait
    )
    if not lock.acquire():
        raise SnapshotBusy("another snapshot run holds the lock")
    try:
        now_ms = ledger.now_ms()
        run = SnapshotRun(months=months_to_copy(ledger, now_ms), started_ms=now_ms)
        for month in run.months:
            before = run.rows_written
            for uids in _scan_index(ledger, month, batch_size):
                _copy_batch(ledger, month, uids, run)
                lock.reacquire()  # still alive: keep others waiting
                if progress is not None:
                    progress(len(uids))
            run.per_month[month] = run.rows_written - before
        run.finished_ms = ledger.now_ms()
        _record(ledger, run)
    finally:
        try:
            lock.release()
        except LockError:  # it expired under a stalled run; the data written stands
            logger.warning("usage snapshot: the lock expired before the run ended")
    logger.info(
        "usage snapshot: %d users, %d rows written, %d lost, %d unknown (%s)",
        run.users, run.rows_written, run.lost, run.unknown, ",".join(run.months),
    )  # fmt: skip
    return run


def last_run(ledger: Ledger | None = None) -> dict[str, Any] | None:
    """The last finished run as recorded in Redis, or None (none yet, or Redis lost it)."""
    ledger = ledger or get_ledger()
    raw = ledger.client.hgetall(ledger.keyspace.snapshot_status())
    if not raw:
        return None
    data = {_text(k): _text(v) for k, v in raw.items()}
    numbers = (
        "started_ms", "finished_ms", "users", "rows_written", "lost", "unknown", "recorded_at",
    )  # fmt: skip
    return {**data, **{k: int(data[k]) for k in numbers if k in data}}


# -- the walk -------------------------------------------------------------------------


def _scan_index(ledger: Ledger, month: str, batch_size: int) -> Iterator[list[str]]:
    """User ids of the month's index in batches, through ``Ledger.active_user_ids``: one
    sorted set on one Redis, every slot's shard (every primary) on a cluster. ZSCAN
    returns every member present for the whole walk at least once; a repeat is
    harmless (its rows already match)."""
    batch: list[str] = []
    for uid in ledger.active_user_ids(month):
        batch.append(uid)
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_batch(ledger: Ledger, month: str, uids: list[str]) -> list[tuple[bool, list[Any]]]:
    """(seen, per-model rows) for each user, in one pipelined round trip."""
    pipe = ledger.client.pipeline(transaction=False)
    for uid in uids:
        pipe.hexists(ledger.keyspace.user_state(uid), "seen")
        pipe.hgetall(ledger.keyspace.model_usage(uid, month))
    replies = pipe.execute()
    return [
        (bool(replies[i]), parse_model_fields(replies[i + 1])) for i in range(0, len(replies), 2)
    ]


def _copy_batch(ledger: Ledger, month: str, uids: list[str], run: SnapshotRun) -> None:
    from llm_quota.models import UsageSnapshot

    run.users += len(uids)
    period = period_of(month)
    pk_field = get_user_model()._meta.pk
    wanted: dict[Any, list[ModelUsage]] = {}
    for uid, (seen, rows) in zip(uids, _read_batch(ledger, month, uids), strict=True):
        if not seen:
            run.lost += 1
            continue
        try:
            wanted[pk_field.to_python(uid)] = rows
        except ValidationError:
            run.unknown += 1
    if not wanted:
        return
    with transaction.atomic():
        known = set(
            get_user_model()
            ._default_manager.filter(pk__in=list(wanted))
            .values_list("pk", flat=True)
        )
        run.unknown += len(wanted) - len(known)
        stored = {
            (row[0], row[1]): row[2:]
            for row in UsageSnapshot.objects.filter(period=period, user_id__in=known).values_list(
                "user_id", "model", *SNAPSHOT_FIELDS
            )
        }
        desired: dict[tuple[Any, str], tuple[int, ...]] = {}
        for pk in known:
            for row in wanted[pk]:
                desired[(pk, row.model)] = (
                    row.requests, row.input_tokens, row.output_tokens, row.base_tokens
                )  # fmt: skip
        # A model the database has but Redis no longer has was reset: it is zero now.
        for key in stored:
            desired.setdefault(key, (0, 0, 0, 0))
        changed = [
            UsageSnapshot(
                user_id=pk, period=period, model=model, **dict(zip(SNAPSHOT_FIELDS, v, strict=True))
            )
            for (pk, model), v in desired.items()
            if stored.get((pk, model)) != v
        ]
        if changed:
            UsageSnapshot.objects.bulk_create(
                changed,
                update_conflicts=True,
                unique_fields=["user", "period", "model"],
                update_fields=[*SNAPSHOT_FIELDS, "updated_at"],
            )
        run.rows_written += len(changed)


def _record(ledger: Ledger, run: SnapshotRun) -> None:
    key = ledger.keyspace.snapshot_status()
    pipe = ledger.client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(
        key,
        mapping={
            "started_ms": run.started_ms,
            "finished_ms": run.finished_ms,
            "users": run.users,
            "rows_written": run.rows_written,
            "lost": run.lost,
            "unknown": run.unknown,
            "months": ",".join(run.months),
            "recorded_at": int(time.time()),
        },
    )
    pipe.expire(key, STATUS_TTL)
    pipe.execute()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
