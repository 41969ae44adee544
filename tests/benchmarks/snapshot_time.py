"""Section 7: how long ``llm_quota.reporting.snapshot`` takes for 10k and 100k active users, and the
longest single Redis command it issues.

It runs on a private redis-server on a spare port (``tests.support.redis_server``), because
measuring every command needs ``SLOWLOG`` at 0 µs, a server setting that must never
be changed on a shared Redis. The users are real rows (bulk-created in the run's
database); their Redis state is one real user's, written by real reserve + settle
calls, then copied in the ledger's key layout with pipelined writes (the snapshot reads
only the ``seen`` marker, the per-model hash and the month's index), so seeding takes
seconds and not the minutes of 200k scripts. The seeded users last settled an hour
ago; after a first copy and a repeat (both full walks), 1% of them settle again through
real scripts and an incremental run (from the watermark) copies them.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
import uuid

import redis
from django.contrib.auth import get_user_model
from django.core.management import call_command

from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.snapshot import snapshot_usage
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits, Price
from tests.benchmarks.measure import Table, verdict

SIZES = (10_000, 100_000)
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5")
SEED_BATCH = 5_000
GOAL_SECONDS, GOAL_COMMAND_MS = 10.0, 10.0
#: How long ago the seeded users last settled.
IDLE_MS = 3_600_000
#: Share of the users who settle again before the incremental run.
ACTIVE_SHARE = 0.01


def _create_users(tag: str, count: int) -> list[int]:
    """``count`` users in bulk; their primary keys."""
    users = get_user_model()
    for start in range(0, count, SEED_BATCH):
        users.objects.bulk_create(
            [users(username=f"{tag}-{n}", password="!")
             for n in range(start, min(count, start + SEED_BATCH))]
        )  # fmt: skip
    return list(
        users.objects.filter(username__startswith=f"{tag}-")
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def _template(ledger: Ledger, uid: int) -> tuple[dict, dict]:
    """One user's state and per-model hashes after real reserve + settle calls."""
    limits = Limits(tokens_per_month=10**12)
    for n in range(30):  # a light month: 30 calls on 3 models
        price = Price(MODELS[n % 3], 1_000_000, 4_000_000)
        decision = ledger.reserve(uid, limits, Estimate(price, 400, 300))
        ledger.settle(decision.reservation, ActualUsage(400, 150))
    _, month = ledger.periods()
    state = ledger.client.hgetall(ledger.keyspace.user_state(uid))
    usage = ledger.client.hgetall(ledger.keyspace.model_usage(uid, month))
    return state, usage


def _seed_redis(ledger: Ledger, uids: list[int], state: dict, usage: dict) -> None:
    """Every user as if they last settled an hour ago (before any run's window)."""
    _, month = ledger.periods()
    index = ledger.keyspace.active_users(month)
    now = ledger.now_ms() - IDLE_MS
    for start in range(0, len(uids), SEED_BATCH):
        pipe = ledger.client.pipeline(transaction=False)
        chunk = uids[start : start + SEED_BATCH]
        for uid in chunk:
            pipe.hset(ledger.keyspace.user_state(uid), mapping=state)
            pipe.hset(ledger.keyspace.model_usage(uid, month), mapping=usage)
        pipe.zadd(index, {str(uid): now for uid in chunk})
        pipe.execute()


#: The benchmark's own instrumentation, not the snapshot's work (a SLOWLOG RESET that
#: frees the previous size's 20k entries was once the "slowest command").
OWN_COMMANDS = (b"SLOWLOG", b"CONFIG")


def _slowlog(client: redis.Redis) -> tuple[list[float], str]:
    """Every logged command's duration in ms (sorted), and the slowest one's name and key."""
    entries = [
        e for e in client.slowlog_get(-1)
        if not _text(e["command"]).upper().encode().startswith(OWN_COMMANDS)
    ]  # fmt: skip
    if not entries:
        return [0.0], "-"
    top = max(entries, key=lambda e: e["duration"])
    command = _text(top["command"])
    return sorted(e["duration"] / 1000 for e in entries), " ".join(command.split()[:2])[:48]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Progress:
    """Prints the snapshot's progress every ``every`` users (a run takes a while)."""

    def __init__(self, total: int, every: int = 20_000) -> None:
        self.total, self.every, self.done, self.started = total, every, 0, time.perf_counter()

    def __call__(self, users: int) -> None:
        before, self.done = self.done, self.done + users
        if self.done // self.every > before // self.every:
            print(f"    snapshot: {self.done:,}/{self.total:,} users "
                  f"({time.perf_counter() - self.started:.0f} s)", flush=True)  # fmt: skip


def _noise_floor(client: redis.Redis, commands: int = 20_000) -> float:
    """The longest of ``commands`` pipelined PINGs (ms): what SLOWLOG shows for a command
    that does nothing, i.e. how long the server can be kept off a core mid-command."""
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    for start in range(0, commands, SEED_BATCH):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(SEED_BATCH, commands - start)):
            pipe.ping()
        pipe.execute()
    durations, _ = _slowlog(client)
    client.config_set("slowlog-log-slower-than", 10_000)
    return durations[-1]


def _settle_some(ledger: Ledger, uids: list[int]) -> None:
    """Real reserve + settle calls for a share of the users: the incremental run's work."""
    limits = Limits(tokens_per_month=10**12)
    price = Price(MODELS[0], 1_000_000, 4_000_000)
    for uid in uids:
        decision = ledger.reserve(uid, limits, Estimate(price, 400, 300))
        ledger.settle(decision.reservation, ActualUsage(400, 150))


#: The parts of a run, by the function that does each (cumulative time under cProfile,
#: which sees the main thread only: Redis is read on a thread, overlapped with the
#: database, and shows as the time the main thread waits for it).
PARTS = (
    ("waiting for Redis reads (read-ahead thread)", "_base.py", "result"),
    ("database reads (known users, stored rows)", "snapshot_sql.py", "read_stored"),
    ("database upsert (one INSERT..SELECT per batch)", "snapshot_sql.py", "upsert_rows"),
    ("commits (deferred foreign-key checks)", "transaction.py", "__exit__"),
)


def _profile(ledger: Ledger) -> str:
    """Where a run's time goes: its parts, then the top functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    snapshot_usage(ledger=ledger, full=True)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    total = max(ct for _, _, _, ct, _ in stats.stats.values())
    lines = [f"    whole run {total:.2f} s under the profiler"]
    for label, filename, function in PARTS:
        spent = max(
            (ct for (f, _, name), (_, _, _, ct, _) in stats.stats.items()
             if name == function and f.endswith(filename)),
            default=0.0,
        )  # fmt: skip
        lines.append(f"    {label:<46} {spent:7.2f} s  {spent / total:5.1%}")
    stats.sort_stats("cumulative").print_stats(12)
    return "\n".join(lines) + "\n" + out.getvalue()


def run(table: Table) -> None:
    from tests.support.redis_server import RedisServer, binaries

    if binaries() is None:
        table.add("7 snapshot", "snapshot run", "skipped", "redis-server not found")
        return
    call_command("migrate", verbosity=0, interactive=False)
    tag = f"bench-snap-{uuid.uuid4().hex[:6]}"
    started = time.perf_counter()
    uids = _create_users(tag, max(SIZES))
    print(f"  {len(uids):,} users created in {time.perf_counter() - started:.1f} s", flush=True)
    server = RedisServer().start()
    client = redis.Redis(port=server.port)
    try:
        client.config_set("slowlog-max-len", 1_000_000)
        for size in SIZES:
            ledger = Ledger(client, prefix=f"snap{size}")
            started = time.perf_counter()
            state, usage = _template(ledger, uids[0])
            _seed_redis(ledger, uids[1:size], state, usage)
            print(f"  {size:,} active users seeded in Redis in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
            client.config_set("slowlog-log-slower-than", 0)  # log every command
            client.slowlog_reset()
            started = time.perf_counter()
            first = snapshot_usage(ledger=ledger, progress=Progress(size), full=True)
            first_s = time.perf_counter() - started
            durations, command = _slowlog(client)
            client.config_set("slowlog-log-slower-than", 10_000)
            started = time.perf_counter()
            again = snapshot_usage(ledger=ledger, full=True)
            again_s = time.perf_counter() - started
            active = uids[1 : 1 + int(size * ACTIVE_SHARE)]
            _settle_some(ledger, active)
            started = time.perf_counter()
            later = snapshot_usage(ledger=ledger)
            later_s = time.perf_counter() - started
            print(f"  {size:,} users: first run {first_s:.1f} s ({first.rows_written:,} rows), "
                  f"repeat {again_s:.1f} s ({again.rows_written} rows), incremental "
                  f"{later_s:.2f} s ({later.users:,} users read, {later.rows_written:,} rows, "
                  f"full walk: {later.full}), {len(durations):,} commands logged",
                  flush=True)  # fmt: skip
            table.add("7 snapshot", f"{size:,} active users, first copy ({first.rows_written:,} "
                      "rows)", f"{first_s:.2f} s",
                      f"< {GOAL_SECONDS:.0f} s: {verdict(first_s < GOAL_SECONDS)}"
                      if size == max(SIZES) else "")  # fmt: skip
            table.add("7 snapshot", f"{size:,} active users, repeat full walk (nothing changed)",
                      f"{again_s:.2f} s")  # fmt: skip
            table.add("7 snapshot", f"{size:,} users, incremental run ({len(active):,} active "
                      f"since the last run; {later.users:,} read)", f"{later_s:.2f} s",
                      "ran as a full walk: check the watermark" if later.full else "")  # fmt: skip
            slowest = durations[-1]
            table.add("7 snapshot", f"{size:,} users: longest Redis command (SLOWLOG)",
                      f"{slowest:.2f} ms",
                      f"{command}; < {GOAL_COMMAND_MS:.0f} ms: "
                      f"{verdict(slowest < GOAL_COMMAND_MS)}")  # fmt: skip
            over = sum(d > 1 for d in durations)
            table.add("7 snapshot", f"{size:,} users: SLOWLOG p99.9 / commands over 1 ms",
                      f"{durations[int(len(durations) * 0.999)]:.3f} ms / {over}",
                      f"of {len(durations):,} commands")  # fmt: skip
            UsageSnapshot.objects.filter(user__username__startswith=f"{tag}-").delete()
            if size == max(SIZES):
                table.add("7 snapshot", "control: longest of 20,000 PINGs (SLOWLOG)",
                          f"{_noise_floor(client):.2f} ms",
                          "this machine's noise floor for the row above")  # fmt: skip
            if size == max(SIZES) and first_s >= GOAL_SECONDS:
                # A 10k-user first copy under the profiler: same path, a tenth of the time.
                print(f"  goal missed; where a first copy's time goes "
                      f"(cProfile, {min(SIZES):,} users):")  # fmt: skip
                print(_profile(Ledger(client, prefix=f"snap{min(SIZES)}")))
                UsageSnapshot.objects.filter(user__username__startswith=f"{tag}-").delete()
    finally:
        client.close()
        server.stop()
        get_user_model().objects.filter(username__startswith=f"{tag}-").delete()
