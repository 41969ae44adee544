"""The snapshot task on real Celery workers, through the real broker (Redis).

Tasks go to this test run's own queue (``celery_queue`` in conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker
from django.conf import settings
from django.db import connection

from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.models import UsageSnapshot
from llm_quota.tasks import SNAPSHOT_TASK, snapshot_usage
from project.celery import app
from tests.support import factories
from tests.support.spend import spend

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def settle_some(ledger, users):
    for i, user in enumerate(users):
        for _ in range(1 + i % 3):
            spend(user, 10 + i, 5, ledger=ledger, multipliers=(1, 1))


def table():
    return sorted(
        (r.user_id, r.period, r.model, r.requests, r.input_tokens, r.base_tokens)
        for r in UsageSnapshot.objects.all()
    )


def expected(ledger, users):
    rows = []
    for user in users:
        usage = ledger.usage(user.pk)
        period = date(int(usage.month[:4]), int(usage.month[4:]), 1)
        for m in usage.by_model:
            rows.append((user.pk, period, m.model, m.requests, m.input_tokens, m.base_tokens))
    return sorted(rows)


def test_beat_runs_the_snapshot_every_snapshot_interval(settings):
    entry = app.conf.beat_schedule["llm-quota-snapshot"]
    assert entry["task"] == SNAPSHOT_TASK and SNAPSHOT_TASK in app.tasks
    assert entry["schedule"] == float(settings.LLM_QUOTA.get("SNAPSHOT_INTERVAL", 60))
    # A tick that waited longer than an interval is dropped, not replayed.
    assert entry["options"]["expires"] == entry["schedule"]


@pytest.mark.django_db(transaction=True)
def test_celery_worker_runs_the_snapshot_and_two_concurrent_runs_equal_one(ledger):
    users = [factories.user() for _ in range(25)]
    settle_some(ledger, users)
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        first, second = snapshot_usage.delay(), snapshot_usage.delay()
        runs = [first.get(timeout=60), second.get(timeout=60)]
    assert [r["users"] for r in runs] == [25, 25]
    assert sorted(r["rows_written"] for r in runs) == [0, 25]  # the later one found it done
    assert table() == expected(ledger, users)


def _postgres_url() -> str:
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    host = db.get("HOST") or "127.0.0.1"
    return f"postgres://{auth}@{host}:{db.get('PORT') or 5432}/{db['NAME']}"


def _celery(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "project", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(connection.vendor != "postgresql", reason="worker processes need PostgreSQL")
@pytest.mark.django_db(transaction=True)
def test_worker_processes_and_beat_snapshot_into_postgresql(
    redis_client, quota_prefix, celery_queue, tmp_path
):
    """Two worker processes and a beat, as deployed: runs overlap, rows stay exact."""
    ledger = Ledger(redis_client, prefix=quota_prefix)  # Redis' clock, as the workers use
    set_default_ledger(ledger)
    users = [factories.user() for _ in range(40)]
    settle_some(ledger, users)
    env = {
        **os.environ,
        "DATABASE_URL": _postgres_url(),
        "REDIS_URL": settings.REDIS_URL,
        "LLM_QUOTA_KEY_PREFIX": quota_prefix,
        "CELERY_TASK_DEFAULT_QUEUE": celery_queue,
        "LLM_QUOTA_SNAPSHOT_INTERVAL": "1",
    }
    # One task at a time per process, so the second run goes to the other worker.
    common = ["--pool", "solo", "--prefetch-multiplier", "1", "--without-gossip"]
    workers = [
        _celery(["worker", "-n", f"{celery_queue}-{n}@%h", "-l", "warning", *common], env)
        for n in (1, 2)
    ]
    beat = None
    try:
        # Two runs at once on two processes: serialised by the lock, same rows as one.
        results = [snapshot_usage.delay() for _ in range(2)]
        runs = [r.get(timeout=90) for r in results]
        assert sorted(r["rows_written"] for r in runs) == [0, 40]
        assert table() == expected(ledger, users)

        # The beat schedule keeps the database following Redis, every interval.
        beat = _celery(["beat", "-l", "warning", "--schedule", str(tmp_path / "beat")], env)
        settle_some(ledger, users[:5])
        deadline = time.monotonic() + 60
        while table() != expected(ledger, users) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert table() == expected(ledger, users)
    finally:
        for proc in [*workers, *([beat] if beat else [])]:
            proc.terminate()
        for proc in [*workers, *([beat] if beat else [])]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        with app.connection_for_write() as conn:  # ticks beat sent that no one took
            conn.default_channel.queue_purge(celery_queue)
