"""A Sentinel failover under traffic: what it costs, measured (issue 17, item 3).

A primary, one replica and three Sentinels (quorum 2) on private loopback ports; three
worker processes drive gated calls through the real admission path (django-redis'
SentinelClient, breaker, fail-open, journal); the primary is SIGKILLed mid-run. The
test reports requests failed, time to recover, usage lost (what the workers billed
minus what Redis charged) and overspend, and checks the bounds in
docs/pages/reliability.md. Bounded: about 45 s for both tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from llm_quota.ledger.restore import month_from_snapshots
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories
from tests.support.sentinel_group import SentinelGroup

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "llmqfailover"
PROCESSES, THREADS, SECONDS, KILL_AT = 3, 4, 9.0, 3.0
USERS = list(range(9001, 9007))
TOKENS_PER_MONTH = 150_000


@pytest.fixture
def sentinel_group(tmp_path):
    """Primary, replica, three Sentinels; whatever started is stopped at the end."""
    group = SentinelGroup(tmp_path, SERVICE).start()
    try:
        primary, replica = group.servers
        yield primary, replica, group.sentinels
    finally:
        group.stop()


def start_worker(config: dict, scratch: Path) -> subprocess.Popen:
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "project.settings",
        "DATABASE_URL": f"sqlite:///{scratch}/unused.sqlite3",  # never read: policies given
    }  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "tests.system.failover_worker", json.dumps(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def drive(config: dict, scratch: Path, schedule: list[tuple[float, Callable[[], object]]]):
    """Run the workers to their end, doing each ``(seconds in, action)`` of ``schedule``
    meanwhile; the last action is the primary's death. Returns the workers' reports
    and when that last action began."""
    workers = [start_worker(config, scratch) for _ in range(PROCESSES)]
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "started"
        began = time.time()
        for at, action in schedule:
            time.sleep(max(0.0, began + at - time.time()))
            acted_at = time.time()
            action()
        outputs = [json.loads(w.communicate(timeout=60)[0].splitlines()[-1]) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)
    return outputs, acted_at


@pytest.mark.django_db
def test_a_sentinel_failover_under_traffic_costs_what_the_docs_say(
    sentinel_group, quota_prefix, tmp_path
):
    primary, replica, sentinels = sentinel_group
    config = {
        "service": SERVICE, "sentinels": [s.port for s in sentinels], "prefix": quota_prefix,
        "processes": PROCESSES, "threads": THREADS, "seconds": SECONDS, "users": USERS,
        "tokens_per_month": TOKENS_PER_MONTH,
    }  # fmt: skip
    # The users' counters start trusted (as after their first request in a deployment),
    # so the workers, which have no database, never need a restore.
    before = Ledger(primary.client(), prefix=quota_prefix, restore=month_from_snapshots)
    for user in USERS:
        before.usage(user)
    outputs, killed_at = drive(config, tmp_path, [(KILL_AT, primary.kill)])

    promoted = redis.sentinel.Sentinel([("127.0.0.1", s.port) for s in sentinels])
    address = promoted.discover_master(SERVICE)
    assert address[1] == replica.port, "the replica was promoted"
    ledger = Ledger(replica.client(), prefix=quota_prefix)

    billed = {u: sum(o["billed"][str(u)] for o in outputs) for u in USERS}
    usage = {u: ledger.usage(u) for u in USERS}
    charged = {u: usage[u].settled_this_month for u in USERS}
    ends = {k: sum(o["ends"][k] for o in outputs) for k in outputs[0]["ends"]}
    # Recovered: every worker has had a call decided by Redis (the new primary) again.
    firsts = [next((t for t in o["metered_at"] if t > killed_at), None) for o in outputs]
    assert all(t is not None for t in firsts), "every worker reached the new primary"
    recovered = max(firsts) - killed_at
    lost = sum(billed.values()) - sum(charged.values())
    overspend = max(max(0, billed[u] - TOKENS_PER_MONTH) for u in USERS)
    held = sum(usage[u].reserved for u in USERS)
    report = {
        "requests": sum(ends.values()), **ends, "seconds_to_recover": round(recovered, 2),
        "billed": sum(billed.values()), "charged": sum(charged.values()), "usage_lost": lost,
        "max_overspend_per_user": overspend, "reserved_left": held,
    }  # fmt: skip
    print("\nSentinel failover:", json.dumps(report))

    assert ends["error"] == 0, [o["errors"] for o in outputs]
    assert all(o["journal_left"] == 0 for o in outputs)
    assert ends["blind"] > 0, "the failover was felt: calls were admitted blind meanwhile"
    assert recovered < 15


@pytest.mark.django_db
def test_a_lagging_replica_loses_at_most_what_settled_after_the_last_snapshot(
    sentinel_group, quota_prefix, tmp_path
):
    """The replica stops receiving writes 2 s before the primary dies (its link cut: it
    cannot authenticate to the primary any more), a snapshot runs 1 s later, and the
    Sentinels promote it. The next snapshot run sees the new replication id and raises
    every user to the snapshot: what stays lost settled after that snapshot.

    The workers stop half a second after the primary dies, so the check runs before
    much is settled on the new primary: a raise goes to max(Redis, snapshot), and
    usage settled there first fills the gap (docs/pages/reliability.md)."""
    primary, replica, sentinels = sentinel_group
    users = [factories.user().pk for _ in USERS]
    config = {
        "service": SERVICE, "sentinels": [s.port for s in sentinels], "prefix": quota_prefix,
        "processes": PROCESSES, "threads": THREADS, "seconds": KILL_AT + 0.5, "users": users,
        "tokens_per_month": TOKENS_PER_MONTH,
    }  # fmt: skip
    before = Ledger(primary.client(), prefix=quota_prefix, restore=month_from_snapshots)
    for user in users:
        before.usage(user)
    snapshot_usage(ledger=before)  # runs before the cut: the replica has their watermark
    snapshotted = {}

    def cut_the_replica() -> None:
        lagging = replica.client()
        lagging.config_set("masteruser", "nobody")  # every reconnection is refused
        lagging.config_set("masterauth", "wrong")
        lagging.client_kill_filter(_type="master")

    def snapshot() -> None:
        snapshot_usage(ledger=before)
        snapshotted["base"] = sum(UsageSnapshot.objects.values_list("base_tokens", flat=True))

    outputs, killed_at = drive(
        config, tmp_path, [(KILL_AT - 2, cut_the_replica), (KILL_AT - 1, snapshot),
                           (KILL_AT, primary.kill)],
    )  # fmt: skip

    address = redis.sentinel.Sentinel([("127.0.0.1", s.port) for s in sentinels]).discover_master(
        SERVICE
    )
    assert address[1] == replica.port, "the lagging replica was promoted"
    promoted = Ledger(replica.client(), prefix=quota_prefix, restore=month_from_snapshots)
    billed = sum(o["billed"][str(u)] for o in outputs for u in users)

    def charged() -> int:
        return sum(promoted.usage(u).settled_this_month for u in users)

    lost_before = billed - charged()
    run = snapshot_usage(ledger=promoted)
    lost_after = billed - charged()
    after_snapshot = billed - snapshotted["base"]
    report = {
        "billed": billed, "lost_on_failover": lost_before, "raised": run.raised_tokens,
        "lost_after_the_check": lost_after, "settled_after_the_snapshot": after_snapshot,
    }  # fmt: skip
    print("\nLagging replica:", json.dumps(report))

    assert all(o["errors"] == [] and o["journal_left"] == 0 for o in outputs)
    assert run.replication_changed
    assert lost_before > 0, "the replica missed writes"
    assert run.raised_tokens > 0 and lost_after == lost_before - run.raised_tokens
    assert 0 <= lost_after <= after_snapshot
