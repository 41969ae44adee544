"""A worker killed during a Redis outage loses no usage (``JOURNAL_DIR``).

A real process journals settles (of calls Redis reserved before it went, and of calls
admitted blind) while its private redis-server is down, and is SIGKILLed. Redis comes
back; the next call of another process adopts the dead worker's file and charges it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from llm_quota.ledger import resilience
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.quota import admission
from llm_quota.rules.accounting import Estimate, Limits, Price
from tests.support import factories
from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def durable_redis(tmp_path):
    """Survives its own SIGKILL (append-only file, fsync always), as production Redis."""
    server = RedisServer(tmp_path / "redis", port=free_port(), durable=True).start()
    yield server
    server.stop()


def start_worker(port: int, journal: Path, prefix: str, pk: int) -> subprocess.Popen:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.system.journal_worker",
         str(port), str(journal), prefix, str(pk)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def expect(worker: subprocess.Popen, word: str) -> str:
    line = worker.stdout.readline()
    assert line.startswith(word), f"worker said {line!r}, exit code {worker.poll()}"
    return line


@pytest.mark.django_db
def test_a_worker_killed_during_an_outage_loses_no_usage(
    durable_redis, tmp_path, settings, quota_prefix
):
    journal = tmp_path / "journal"
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "JOURNAL_DIR": str(journal)}
    factories.tier("free", is_default=True)
    user = factories.user()
    worker = start_worker(durable_redis.port, journal, quota_prefix, user.pk)
    try:
        expect(worker, "reserved")
        durable_redis.kill()
        worker.stdin.write("go\n")
        worker.stdin.flush()
        charged = int(expect(worker, "charged").split()[1])
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    assert len(list(journal.iterdir())) == 1, "the dead worker's file is left behind"

    durable_redis.start()
    client = redis.Redis(port=durable_redis.port, socket_timeout=5)
    ledger = Ledger(client, prefix=quota_prefix)
    set_default_ledger(ledger)  # a fresh outage state: it looks into JOURNAL_DIR at once
    # The next call of a living process, after Redis is back: it adopts and charges.
    estimate = Estimate(Price("gpt-4o", 1_000_000, 4_000_000), 10, 20)
    decision = ledger.reserve(user.pk, Limits(tokens_per_month=10**9), estimate)
    reported = {"prompt_tokens": 10, "completion_tokens": 1}
    admission.settle(decision.reservation, reported, ledger=ledger)

    usage = ledger.usage(user.pk)
    assert usage.tokens_this_month == charged + 14
    assert usage.reserved == 0 and usage.in_flight == 0
    assert len(resilience.outage().journal) == 0
    (row,) = usage.by_model
    assert row.requests == 5 + 5 + 1
    client.connection_pool.disconnect()
