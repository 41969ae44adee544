"""Copy each active user's Redis usage into ``UsageSnapshot``: the durable record.

Redis is the only counter but may lose its data; the snapshots are what
``ledger/restore.py`` brings back. So a run is safe to repeat at any time:

- it finds users through the index ``settle.lua`` keeps (a ZSET per month, user ->
  time of their last settle), walked with ZSCAN in batches, never ``KEYS``;
- it reads Redis in pipelines, and changes a counter only where Redis is behind the
  database (below, ``raise.lua``: to a maximum, so a repeat changes nothing);
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

A user whose counters are *behind* the database in the same generation (a promoted
replica missed the last writes; a reset starts a new generation, ``reset.lua``) is
raised back to it (``raise.lua``), and the database keeps the higher figures. Every
run does this for the users it reads, and for API keys, teams and the global caps
(``payer_catch_up``); a run that finds Redis' replication id changed since the last
one (a failover, a restart) reads every user and key too, the database's as well as
the index's, since a stale replica's index misses the same writes.
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
from redis.exceptions import LockError, ResponseError

from llm_quota.ledger import keys
from llm_quota.ledger.default import get_ledger
from llm_quota.ledger.replies import ModelUsage, parse_model_fields, text
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.key_snapshot import snapshot_keys
from llm_quota.reporting.payer_catch_up import Raised, catch_up_global
from llm_quota.reporting.snapshot_days import day_date, upsert_days
from llm_quota.reporting.snapshot_sql import Row, database, read_stored, upsert_rows
from llm_quota.reporting.team_snapshot import snapshot_teams
from llm_quota.rules.periods import MONTH_GRACE_MS, first_day, month_end_ms, previous_month

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
    raised_users: int = 0  # users whose counters were behind the database and raised
    raised_tokens: int = 0  # base tokens those raises added back (writes Redis lost)
    raised_keys: int = 0  # API keys behind the database and raised (``payer_catch_up``)
    raised_teams: int = 0  # teams behind the database and raised
    raised_global: int = 0  # global caps' counters (day, month) behind it and raised
    replication_changed: bool = False  # Redis' replication id changed: every user read
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
    replication_id: str = ""  # Redis' now (``replication_id``), kept with the watermark
    replication_changed: bool = False  # not the last run's: read the database's users too


def months_to_copy(ledger: Ledger, now_ms: int) -> list[str]:
    """The current month, and the one just closed while Redis keeps its counters (late
    settles still land there). Past that grace the database is the closed month's only
    record: a copy would write Redis' empty figures over it (a key or a team reset since
    has a new generation, so nothing would stop it), and find every team behind."""
    _, month = ledger.periods(now_ms)
    closed = previous_month(month)
    if now_ms < month_end_ms(closed, ledger.timezone) + MONTH_GRACE_MS:
        return [month, closed]
    return [month]


def plan_run(ledger: Ledger, now_ms: int, *, full: bool = False) -> RunPlan:
    """Full walk or incremental, from the watermark the last successful run left."""
    months = months_to_copy(ledger, now_ms)
    since, last_full, last_id = ledger.client.hmget(
        ledger.keyspace.snapshot_watermark(), "since_ms", "full_ms", "replid"
    )
    current = replication_id(ledger)
    # The watermark came from another data set (a replica promoted since, a restart
    # from disk): that one may have missed writes anywhere, so every user is read.
    changed = last_id is not None and text(last_id) != current
    if full or changed or since is None or last_full is None:  # first run, or Redis lost it
        return RunPlan(months, None, now_ms, current, changed)
    if not int(since) <= now_ms < int(last_full) + FULL_WALK_EVERY_MS:
        # Due for a full walk, or the clock went back past the last run: a watermark
        # from the future would hide the settles in between.
        return RunPlan(months, None, now_ms, current)
    return RunPlan(months, int(since) - WATERMARK_OVERLAP_MS, int(last_full), current)


def replication_id(ledger: Ledger) -> str:
    """Which data set Redis holds: INFO's ``master_replid``, which a replica promoted
    to primary, or a server restarted, changes (each primary's, on a cluster); ``""``
    where INFO is not allowed (the check then rests on the runs' own reads)."""
    try:
        if ledger.cluster:
            reply = ledger.client.info("replication", target_nodes=ledger.client.PRIMARIES)
        else:
            reply = ledger.client.info("replication")
    except ResponseError:
        return ""
    infos = [reply] if "master_replid" in reply else list(reply.values())
    return ",".join(sorted(str(info.get("master_replid", "")) for info in infos))


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
            since_ms=plan.since_ms, replication_changed=plan.replication_changed,
        )  # fmt: skip
        report = _ProgressLog(run)
        lost: dict[str, tuple[set[str], set[str]]] = {}
        raised_keys, raised_teams = Raised(), Raised()
        today, _ = ledger.periods(now_ms)
        for month in run.months:
            before = run.rows_written
            pending = set(_lost_ids(ledger, month))
            skipped: set[str] = set()
            day = today if month == run.months[0] else ""  # the day, with its month
            walk = _walk(ledger, month, plan.since_ms, pending)
            if plan.replication_changed:
                walk = _and_stored(walk, month)
            batches = _batches(walk, batch_size)
            for uids, users in _read_ahead(ledger, month, batches, day):
                _copy_batch(ledger, month, uids, users, run, skipped, day)
                lock.reacquire()  # still alive: keep others waiting
                if progress is not None:
                    progress(len(uids))
                report.tick()
            run.per_month[month] = run.rows_written - before
            lost[month] = (pending, skipped)
            run.keys += snapshot_keys(
                ledger, month, since_ms=plan.since_ms, day=day,
                stored_too=plan.replication_changed, raised=raised_keys,
            )  # fmt: skip
            run.teams += snapshot_teams(ledger, month, day=day, raised=raised_teams)
            lock.reacquire()
        global_added = catch_up_global(ledger, today, run.months[0])
        run.raised_keys, run.raised_teams = raised_keys.payers, raised_teams.payers
        run.raised_global = sum(1 for added in global_added if added)
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
    if run.raised_users:
        logger.warning(
            "usage snapshot: %d users' counters were behind the database (writes Redis "
            "lost: a failover or a restart); raised by %d base tokens",
            run.raised_users, run.raised_tokens,
        )  # fmt: skip
    if run.raised_keys or run.raised_teams or run.raised_global:
        logger.warning(
            "usage snapshot: payers' counters were behind the database (writes Redis "
            "lost), raised: %d API keys by %d base tokens, %d teams by %d, the global "
            "day by %d and month by %d",
            run.raised_keys, raised_keys.tokens, run.raised_teams, raised_teams.tokens,
            *global_added,
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
        _copy_batch(ledger, month, uids, _read_batch(ledger, month, uids, day), run, set(), day)
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
        "full", "raised_users", "raised_keys", "raised_teams", "raised_global",
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


def _and_stored(walk: Iterable[str], month: str) -> Iterator[str]:
    """The index's users, then those the database has a row of ``month`` for and the
    index does not list: a replica that missed a user's first settle of the month
    misses its index entry too. Only after a failover or a restart (a set of ids)."""
    listed: set[str] = set()
    for uid in walk:
        listed.add(uid)
        yield uid
    stored = (
        UsageSnapshot.objects.using(database())
        .filter(period=first_day(month))
        .order_by()
        .values_list("user_id", flat=True)
        .distinct()
    )
    for pk in stored.iterator(chunk_size=BATCH_USERS):
        uid = keys.user_id(pk)
        if uid not in listed:
            yield uid


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


#: What a batch read holds per user: seen, the generation, the month's per-model rows,
#: and the day counter (None when the run does not copy a day for this month).
UserRead = tuple[bool, int, list[ModelUsage], int | None]


def _read_batch(ledger: Ledger, month: str, uids: list[str], day: str = "") -> list[UserRead]:
    """(seen, generation, per-model rows, day counter) for each user, in one pipelined
    round trip.
    The day counter holds the estimates of calls in flight too: restored, it errs on
    the side of refusing (by at most those estimates), never of overspending."""
    pipe = ledger.client.pipeline(transaction=False)
    for uid in uids:
        pipe.hmget(ledger.keyspace.user_state(uid), "seen", "gen")
        pipe.hgetall(ledger.keyspace.model_usage(uid, month))
        if day:
            pipe.get(ledger.keyspace.day_counter(uid, day))
    replies = pipe.execute()
    step = 3 if day else 2
    return [
        (
            replies[i][0] is not None,
            int(replies[i][1] or 0),
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
    ledger: Ledger,
    month: str,
    uids: list[str],
    users: list[UserRead],
    run: SnapshotRun,
    lost: set[str],
    day: str = "",
) -> None:
    """Write the rows of ``uids`` (read as ``users``) that differ from the database;
    ``lost`` collects the users skipped because their counters are gone. A user Redis
    holds below the database in the same generation is raised first (``_catch_up``)."""
    run.users += len(uids)
    period = first_day(month)
    pk_field = get_user_model()._meta.pk
    wanted: dict[Any, tuple[str, int, list[ModelUsage]]] = {}
    days: dict[Any, int] = {}
    for uid, (seen, generation, models, today) in zip(uids, users, strict=True):
        if not seen:
            run.lost += 1
            lost.add(uid)
            continue
        try:
            pk = pk_field.to_python(uid)
        except ValidationError:
            run.unknown += 1
            continue
        wanted[pk] = (uid, generation, models)
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
            _, generation, models = wanted[pk]
            for usage in models:
                desired[(pk, usage.model)] = (
                    usage.requests, usage.input_tokens, usage.output_tokens,
                    usage.base_tokens, generation,
                )  # fmt: skip
        # A model the database has but Redis does not: reset (another generation: it
        # is zero now), or lost with the last writes (the same one: _catch_up).
        for pk, model in stored:
            if pk in wanted:
                desired.setdefault((pk, model), (0, 0, 0, 0, wanted[pk][1]))
        for pk, added in _catch_up(ledger, month, wanted, stored, desired).items():
            run.raised_users += 1
            run.raised_tokens += added
            if pk in days:
                days[pk] += added
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


#: A ``UsageSnapshot`` row's counters as the fields of the user's usage hash in Redis.
FIELD_KINDS = ("req", "in", "out", "base")


def _catch_up(
    ledger: Ledger,
    month: str,
    wanted: dict[Any, tuple[str, int, list[ModelUsage]]],
    stored: dict[tuple[Any, str], tuple[int, ...]],
    desired: dict[tuple[Any, str], tuple[int, ...]],
) -> dict[Any, int]:
    """Raise in Redis every user whose ``desired`` rows (read from Redis) are below the
    ``stored`` ones of the same generation, and keep the higher figures in ``desired``.

    Settled usage only grows within a generation, so a lower figure is a write Redis
    lost (a promoted replica, a restart from an old file), never a legitimate change.
    Returns the base tokens added per user pk (only users actually raised)."""
    behind: dict[Any, dict[str, int]] = {}
    for (pk, model), old in stored.items():
        new = desired.get((pk, model))
        if (
            new is None
            or old[4] != new[4]
            or all(o <= n for o, n in zip(old[:4], new[:4], strict=True))
        ):
            continue
        fields = behind.setdefault(pk, {})
        for kind, o, n in zip(FIELD_KINDS, old[:4], new[:4], strict=True):
            if o > n:
                fields[f"{kind}|{model}"] = o
        desired[(pk, model)] = (*map(max, old[:4], new[:4]), new[4])
    raised: dict[Any, int] = {}
    for pk, fields in behind.items():
        uid, generation, _ = wanted[pk]
        added = ledger.raise_to_snapshot(uid, generation, month, fields)
        if added:
            raised[pk] = added
    return raised


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
            "raised_users": run.raised_users,
            "raised_keys": run.raised_keys,
            "raised_teams": run.raised_teams,
            "raised_global": run.raised_global,
            "months": ",".join(run.months),
            "full": int(run.full),
            "recorded_at": int(time.time()),
        },
    )
    pipe.expire(key, STATUS_TTL)
    pipe.hset(
        mark,
        mapping={
            "since_ms": run.started_ms, "full_ms": plan.last_full_ms,
            "replid": plan.replication_id,
        },
    )  # fmt: skip
    pipe.expire(mark, WATERMARK_TTL)
    pipe.execute()
