"""Copy each active user's Redis usage into ``UsageSnapshot``: the durable record.

Redis is the only counter but may lose its data; the snapshots are what
``ledger/restore.py`` brings back. So a run is safe to repeat at any time:

- it finds users through the index ``settle.lua`` keeps (a ZSET per month, user ->
  time of their last settle), walked with ZSCAN in batches, never ``KEYS``;
- it only reads Redis (a pipeline, no script), so it never changes a counter;
- it writes absolute values, and only the rows that differ, with an upsert on
  (user, period, model) (``snapshot_sql.py``): a duplicate or concurrent run writes
  the same rows or nothing;
- runs are serialised by a Redis lock, so an older read never overwrites a newer one.

A run is incremental where it can be: it reads the users who settled since the last
successful run started (the *watermark*, kept in Redis), less ``WATERMARK_OVERLAP_MS``
for clocks that differ or step back. A settle during a run is stamped after that
run's start, in the closed month as in the current one, so the next run reads it.
Without a watermark (the first run, or Redis lost it), every ``FULL_WALK_EVERY_MS``,
or when asked, a run walks the whole index.

A user whose ``seen`` marker is missing lost their counters with Redis and has not
been restored yet: their partial figures are never copied over the full ones in the
database. A set the next runs read whatever the watermark remembers them until their
counters are back and copied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from redis.exceptions import LockError

from llm_quota.ledger import keys
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import ModelUsage, parse_model_fields, text
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.reporting.key_snapshot import snapshot_keys
from llm_quota.reporting.snapshot_days import day_date, upsert_days
from llm_quota.reporting.snapshot_sql import Row, database, read_stored, upsert_rows
from llm_quota.reporting.team_snapshot import snapshot_teams
from llm_quota.rules.periods import first_day, previous_month

logger = logging.getLogger("llm_quota")

#: Seconds a run holds the lock without progress before another may take it.
LOCK_TTL = 60
#: How long the status of the last run is kept (the admin's durability window).
STATUS_TTL = 40 * 86400
#: How far before the previous run's start an incremental run looks (index times are
#: the settling primary's clock; this covers skew between clocks and small steps back).
WATERMARK_OVERLAP_MS = 120_000
#: A full walk at least this often, whatever the watermark: a bound on how long
#: anything an incremental run could miss would stay out of the database.
FULL_WALK_EVERY_MS = 3_600_000
#: A watermark older than this is dropped (no run for a day: start from scratch).
WATERMARK_TTL = 86400
#: Users per batch: one Redis pipeline, one read of stored rows, one upsert and one
#: commit each. Every batch pays fixed costs (three database round trips, a WAL flush,
#: hand-offs of the GIL with the reading thread), so fewer, larger batches are faster
#: up to a point (``docs/pages/benchmarks.md``); each Redis command stays as short either way.
BATCH_USERS = 2000
#: Seconds between progress lines in the log during a long run.
PROGRESS_EVERY = 10.0
#: Members per SADD/SREM when the lost-user sets are updated (each command stays short).
SET_BATCH = 1000


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
    days_written: int = 0  # ``DaySnapshot`` rows inserted or changed
    lost: int = 0  # users skipped: counters lost, not restored yet
    unknown: int = 0  # ids with no such user in the database
    keys: int = 0  # API keys read (``key_snapshot``)
    teams: int = 0  # team rows written (``team_snapshot``)
    per_month: dict[str, int] = field(default_factory=dict)
    full: bool = True  # walked the whole index (else: users active since ``since_ms``)
    since_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunPlan:
    """Which users a run reads: ``since_ms`` None walks the whole index."""

    months: list[str]
    since_ms: int | None
    last_full_ms: int  # when the last full walk started (this one's start if full)


def months_to_copy(ledger: Ledger, now_ms: int) -> list[str]:
    """The current month and the one just closed (late settles still land there)."""
    _, month = ledger.periods(now_ms)
    return [month, previous_month(month)]


def plan_run(ledger: Ledger, now_ms: int, *, full: bool = False) -> RunPlan:
    """Full walk or incremental, from the watermark the last successful run left."""
    months = months_to_copy(ledger, now_ms)
    since, last_full = ledger.client.hmget(
        ledger.keyspace.snapshot_watermark(), "since_ms", "full_ms"
    )
    if full or since is None or last_full is None:  # first run, or Redis lost it
        return RunPlan(months, None, now_ms)
    if not int(since) <= now_ms < int(last_full) + FULL_WALK_EVERY_MS:
        # Due for a full walk, or the clock went back past the last run: a watermark
        # from the future would hide the settles in between.
        return RunPlan(months, None, now_ms)
    return RunPlan(months, int(since) - WATERMARK_OVERLAP_MS, int(last_full))


def count_active(ledger: Ledger | None = None, *, full: bool = False) -> int:
    """Index entries the next run will read (a progress bar's total; approximate, as
    users keep settling)."""
    ledger = ledger or get_ledger()
    plan = plan_run(ledger, ledger.now_ms(), full=full)
    total = sum(ledger.count_active_users(m, since_ms=plan.since_ms) for m in plan.months)
    if plan.since_ms is not None:
        total += sum(ledger.client.scard(ledger.keyspace.snapshot_lost(m)) for m in plan.months)
    return total


def snapshot_usage(
    *,
    ledger: Ledger | None = None,
    batch_size: int = BATCH_USERS,
    progress: Callable[[int], None] | None = None,
    lock_wait: float = 30.0,
    full: bool = False,
) -> SnapshotRun:
    """Copy the current and just-closed month of the users active since the last run
    (of every user in the index if ``full``, or when there is no usable watermark)."""
    ledger = ledger or get_ledger()
    lock = ledger.client.lock(
        ledger.keyspace.snapshot_lock(), timeout=LOCK_TTL, blocking_timeout=lock_wait
    )
    if not lock.acquire():
        raise SnapshotBusy("another snapshot run holds the lock")
    try:
        now_ms = ledger.now_ms()
        plan = plan_run(ledger, now_ms, full=full)
        run = SnapshotRun(
            months=plan.months, started_ms=now_ms, full=plan.since_ms is None,
            since_ms=plan.since_ms,
        )  # fmt: skip
        report = _ProgressLog(run)
        lost: dict[str, tuple[set[str], set[str]]] = {}
        today, _ = ledger.periods(now_ms)
        for month in run.months:
            before = run.rows_written
            pending = set(_lost_ids(ledger, month))
            skipped: set[str] = set()
            day = today if month == run.months[0] else ""  # the day, with its month
            batches = _batches(_walk(ledger, month, plan.since_ms, pending), batch_size)
            for uids, users in _read_ahead(ledger, month, batches, day):
                _copy_batch(month, uids, users, run, skipped, day)
                lock.reacquire()  # still alive: keep others waiting
                if progress is not None:
                    progress(len(uids))
                report.tick()
            run.per_month[month] = run.rows_written - before
            lost[month] = (pending, skipped)
            run.keys += snapshot_keys(ledger, month, since_ms=plan.since_ms, day=day)
            run.teams += snapshot_teams(ledger, month, day=day)
            lock.reacquire()
        run.finished_ms = ledger.now_ms()
        _remember_lost(ledger, lost)
        _record(ledger, run, plan)
    finally:
        try:
            lock.release()
        except LockError:  # it expired under a stalled run; the data written stands
            logger.warning("usage snapshot: the lock expired before the run ended")
    logger.info(
        "usage snapshot (%s): %d users, %d rows written, %d lost, %d unknown (%s), %.1f s",
        "full" if run.full else "incremental", run.users, run.rows_written, run.lost,
        run.unknown, ",".join(run.months), (run.finished_ms - run.started_ms) / 1000,
    )  # fmt: skip
    return run


def snapshot_users(user_ids: Iterable[Any], *, ledger: Ledger | None = None) -> SnapshotRun:
    """Copy these users' current and just-closed month now, as a run would.

    For the admin's reset, which takes the figures about to be forgiven into the
    database first. The caller holds the snapshot lock, so no run interleaves; the
    watermark and the last run's status are left as they are.
    """
    ledger = ledger or get_ledger()
    now_ms = ledger.now_ms()
    uids = [keys.user_id(uid) for uid in user_ids]
    run = SnapshotRun(months=months_to_copy(ledger, now_ms), started_ms=now_ms, full=False)
    today, _ = ledger.periods(now_ms)
    for month in run.months:
        before = run.rows_written
        day = today if month == run.months[0] else ""
        _copy_batch(month, uids, _read_batch(ledger, month, uids, day), run, set(), day)
        run.per_month[month] = run.rows_written - before
    run.finished_ms = ledger.now_ms()
    return run


class _ProgressLog:
    """A log line every ``PROGRESS_EVERY`` seconds, so a long run shows it is moving
    (the Celery task has no progress bar)."""

    def __init__(self, run: SnapshotRun) -> None:
        self.run = run
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            logger.info(
                "usage snapshot: %d users read, %d rows written so far (%.0f s)",
                self.run.users, self.run.rows_written, now - self.started,
            )  # fmt: skip


def last_run(ledger: Ledger | None = None) -> dict[str, Any] | None:
    """The last finished run as recorded in Redis, or None (none yet, or Redis lost it)."""
    ledger = ledger or get_ledger()
    raw = ledger.client.hgetall(ledger.keyspace.snapshot_status())
    if not raw:
        return None
    data = {text(k): text(v) for k, v in raw.items()}
    numbers = (
        "started_ms", "finished_ms", "users", "rows_written", "lost", "unknown", "recorded_at",
        "full",
    )  # fmt: skip
    return {**data, **{k: int(data[k]) for k in numbers if k in data}}


# -- the walk -------------------------------------------------------------------------


def _walk(ledger: Ledger, month: str, since_ms: int | None, pending: set[str]) -> Iterator[str]:
    """User ids to read, through ``Ledger.active_user_ids``: one sorted set on one Redis,
    every slot's shard (every primary) on a cluster; from ``since_ms`` on if given,
    plus the users skipped as lost before. ZSCAN returns every member present for the
    whole walk at least once; a repeat is harmless (its rows already match)."""
    found = ledger.active_user_ids(month, since_ms=since_ms)
    if since_ms is None:  # the whole index: the pending users are in it
        return found
    return chain(found, sorted(pending))


def _batches(ids: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for uid in ids:
        batch.append(uid)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _lost_ids(ledger: Ledger, month: str) -> Iterator[str]:
    """The users earlier runs skipped as lost (SSCAN: short commands, however many)."""
    for member in ledger.client.sscan_iter(ledger.keyspace.snapshot_lost(month), count=SET_BATCH):
        yield text(member)


#: What a batch read holds per user: seen, the month's per-model rows, and the day
#: counter (None when the run does not copy a day for this month).
UserRead = tuple[bool, list[ModelUsage], int | None]


def _read_batch(ledger: Ledger, month: str, uids: list[str], day: str = "") -> list[UserRead]:
    """(seen, per-model rows, day counter) for each user, in one pipelined round trip.
    The day counter holds the estimates of calls in flight too: restored, it errs on
    the side of refusing (by at most those estimates), never of overspending."""
    pipe = ledger.client.pipeline(transaction=False)
    for uid in uids:
        pipe.hexists(ledger.keyspace.user_state(uid), "seen")
        pipe.hgetall(ledger.keyspace.model_usage(uid, month))
        if day:
            pipe.get(ledger.keyspace.day_counter(uid, day))
    replies = pipe.execute()
    step = 3 if day else 2
    return [
        (
            bool(replies[i]),
            parse_model_fields(replies[i + 1]),
            int(replies[i + 2] or 0) if day else None,
        )
        for i in range(0, len(replies), step)
    ]


def _read_ahead(
    ledger: Ledger, month: str, batches: Iterable[list[str]], day: str = ""
) -> Iterator[tuple[list[str], list[UserRead]]]:
    """Each batch with its Redis reads, the next batch read on a thread meanwhile.

    Reading (a pipeline, then parsing the replies) is client CPU; writing is mostly
    waiting for the database, which releases the GIL: overlapped, a run takes about
    the longer of the two instead of their sum. One read in flight at a time, so
    Redis sees the same pipelines as before; the database is used by this thread only.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-quota-snapshot") as pool:
        ahead: tuple[list[str], Future[list[UserRead]]] | None = None
        for uids in batches:
            future = pool.submit(_read_batch, ledger, month, uids, day)
            if ahead is not None:
                yield ahead[0], ahead[1].result()
            ahead = (uids, future)
        if ahead is not None:
            yield ahead[0], ahead[1].result()


def _copy_batch(
    month: str,
    uids: list[str],
    users: list[UserRead],
    run: SnapshotRun,
    lost: set[str],
    day: str = "",
) -> None:
    """Write the rows of ``uids`` (read as ``users``) that differ from the database;
    ``lost`` collects the users skipped because their counters are gone."""
    run.users += len(uids)
    period = first_day(month)
    pk_field = get_user_model()._meta.pk
    wanted: dict[Any, list[ModelUsage]] = {}
    days: dict[Any, int] = {}
    for uid, (seen, models, today) in zip(uids, users, strict=True):
        if not seen:
            run.lost += 1
            lost.add(uid)
            continue
        try:
            pk = pk_field.to_python(uid)
        except ValidationError:
            run.unknown += 1
            continue
        wanted[pk] = models
        if today is not None:
            days[pk] = today
    if not wanted:
        return
    using = database()
    with transaction.atomic(using=using):
        known, stored = read_stored(list(wanted), period, using=using)
        run.unknown += len(wanted) - len(known)
        desired: dict[tuple[Any, str], tuple[int, ...]] = {}
        for pk in known:
            for usage in wanted[pk]:
                desired[(pk, usage.model)] = (
                    usage.requests, usage.input_tokens, usage.output_tokens, usage.base_tokens
                )  # fmt: skip
        # A model the database has but Redis no longer has was reset: it is zero now.
        for key in stored:
            desired.setdefault(key, (0, 0, 0, 0))
        changed: list[Row] = [
            (pk, model, *values)
            for (pk, model), values in desired.items()
            if stored.get((pk, model)) != values
        ]
        run.rows_written += upsert_rows(changed, period, timezone.now(), using=using)
        if day:
            run.days_written += upsert_days(
                {pk: n for pk, n in days.items() if pk in known}, day_date(day), using=using
            )


def _remember_lost(ledger: Ledger, lost: dict[str, tuple[set[str], set[str]]]) -> None:
    """Per month: drop the users read back (``pending - skipped``), add the new ones
    skipped (``skipped - pending``); an untouched set costs nothing."""
    pipe = ledger.client.pipeline(transaction=False)
    for month, (pending, skipped) in lost.items():
        key = ledger.keyspace.snapshot_lost(month)
        done, new = sorted(pending - skipped), sorted(skipped - pending)
        for start in range(0, len(done), SET_BATCH):
            pipe.srem(key, *done[start : start + SET_BATCH])
        for start in range(0, len(new), SET_BATCH):
            pipe.sadd(key, *new[start : start + SET_BATCH])
        if new:
            pipe.expire(key, STATUS_TTL)
    if len(pipe):
        pipe.execute()


def _record(ledger: Ledger, run: SnapshotRun, plan: RunPlan) -> None:
    """The run's status for the admin, and the watermark the next run starts from."""
    key, mark = ledger.keyspace.snapshot_status(), ledger.keyspace.snapshot_watermark()
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
            "full": int(run.full),
            "recorded_at": int(time.time()),
        },
    )
    pipe.expire(key, STATUS_TTL)
    pipe.hset(mark, mapping={"since_ms": run.started_ms, "full_ms": plan.last_full_ms})
    pipe.expire(mark, WATERMARK_TTL)
    pipe.execute()
