"""A planned failover loses only the writes of a short window (issue 17).

``SENTINEL FAILOVER`` promotes the replica while the old primary is still up and
writable; a warm redis-py pool keeps writing to it until Sentinel demotes it (12 to
17 s), and its resync throws those writes away. ``sentinel_watch`` hears the
Sentinels' ``+switch-master`` and makes the ledger's pools ask again at once.

Each test writes (``INCR``, acknowledged) every 10 ms through the ledger's own client,
sync (``ledger_client()``) or async (``async_client_like``, as the async ledger makes
it), across a ``SENTINEL FAILOVER``, and counts what the new primary kept. With the
watcher switched off the old loss shows, so these tests can fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from llm_quota.ledger import sentinel_watch
from llm_quota.ledger.connections import async_client_like, ledger_client
from tests.support.sentinel_group import SentinelGroup

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EVERY = 0.01
#: With the watcher, at most this much of the writes is lost: the Sentinel announces
#: the switch about 1 s after it promoted the replica (it learns of the promotion from
#: the replica's INFO, every second during a failover); twice that, for a busy machine.
WINDOW = 2.0


class Writer:
    """INCRs a key every 10 ms until stopped; keeps each acknowledged reply and when."""

    def __init__(self, key: str) -> None:
        self.key, self.acked, self.failed = key, [], 0
        self.stop = threading.Event()

    def sync(self) -> None:
        client = ledger_client()
        while not self.stop.is_set():
            try:
                self.acked.append((time.monotonic(), client.incr(self.key)))
            except redis.RedisError:
                self.failed += 1
            time.sleep(EVERY)

    def run_async(self) -> None:
        async def write() -> None:
            client = async_client_like(ledger_client())
            while not self.stop.is_set():
                try:
                    self.acked.append((time.monotonic(), await client.incr(self.key)))
                except redis.RedisError:
                    self.failed += 1
                await asyncio.sleep(EVERY)
            await client.aclose()

        asyncio.run(write())

    def lost_window(self) -> float:
        """Seconds between the first and the last acknowledged write that was lost: the
        replies count up on the old primary, then start again lower on the new one."""
        values = [value for _, value in self.acked]
        drops = [n for n in range(1, len(values)) if values[n] <= values[n - 1]]
        if not drops:
            return 0.0
        drop = drops[0]
        first_lost = next(n for n in range(drop) if values[n] >= values[drop])
        return self.acked[drop - 1][0] - self.acked[first_lost][0]


@pytest.fixture
def group(tmp_path):
    started = SentinelGroup(tmp_path, "llmqswitch" + uuid.uuid4().hex[:8]).start()
    yield started
    started.stop()


@pytest.fixture
def sentinel_ledger(settings, group):
    """The ledger's client is django-redis' SentinelClient on the group (a cache alias
    of its own: the tests' default cache stays as it is)."""
    settings.CACHES = {
        **settings.CACHES,
        "sentinel": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://{group.service}/0",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
                "SENTINELS": [("127.0.0.1", port) for port in group.sentinel_ports],
                "SOCKET_CONNECT_TIMEOUT": 0.5,
                "SOCKET_TIMEOUT": 0.5,
            },
        },
    }
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "REDIS_CACHE_ALIAS": "sentinel"}
    return group


@pytest.mark.parametrize("watching", [True, False], ids=["watched", "unwatched"])
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_planned_failover_loses_at_most_a_short_window_of_writes(
    sentinel_ledger, monkeypatch, kind, watching
):
    group = sentinel_ledger
    monkeypatch.setattr(sentinel_watch, "ENABLED", watching)
    watcher = sentinel_watch.watcher
    sentinels = {("127.0.0.1", port) for port in group.sentinel_ports}
    writer = Writer("llmq:switch:" + kind)
    thread = threading.Thread(target=writer.sync if kind == "sync" else writer.run_async)
    thread.start()
    try:
        time.sleep(1.0)
        if watching:  # every Sentinel: any one would do, but which one says it first?
            deadline = time.monotonic() + 5
            while not sentinels <= watcher.listening and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sentinels <= watcher.listening, "subscribed to the Sentinels"
        else:
            assert not sentinels & watcher.listening
        began = time.monotonic()
        new = group.fail_over()
        took = time.monotonic() - began
        time.sleep(1.0)  # the writes go on, on the new primary
    finally:
        writer.stop.set()
        thread.join(10)
    kept = int(new.client().get(writer.key) or 0)
    lost = len(writer.acked) - kept
    report = {
        "kind": kind, "watching": watching, "acknowledged": len(writer.acked),
        "failed": writer.failed, "kept": kept, "lost": lost,
        "lost_window_s": round(writer.lost_window(), 3), "failover_s": round(took, 1),
    }  # fmt: skip
    print("\nSentinel switch:", json.dumps(report))

    assert len(writer.acked) > 200 and kept > 0
    if watching:
        assert watcher.switches_heard > 0
        assert lost <= WINDOW / EVERY, report
        assert writer.lost_window() < WINDOW, report
    else:  # the old primary took the writes until Sentinel demoted it
        assert lost > 2 * WINDOW / EVERY, report


SCRIPT = """
import asyncio, json, threading
import django
django.setup()
from llm_quota.ledger.default import get_async_ledger, get_ledger
from llm_quota.ledger.sentinel_watch import watcher
get_ledger().client.ping()
asyncio.run(get_async_ledger())
print(json.dumps({"running": watcher.running,
                  "threads": [t.name for t in threading.enumerate()]}))
"""


def test_a_plain_redis_project_starts_no_watcher(redis_client):
    """A process whose ledger is on plain Redis (the tests' ``REDIS_URL``, or the
    embedded one) builds both ledgers and has no watcher thread."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["running"] is False
    assert sentinel_watch.SwitchWatcher.name not in seen["threads"]
